"""Attention knockout figure and tables (after Geva et al. 2023) from the library: memorized vs
non-memorized idioms (and ordinary text), the last position cut from each source per window of layers.

    python experiments/attention_knockout.py --out out/attention_knockout [--per-group 50]
        [--sources context last_word bos] [--window 5] [--demo]

Probes: the bundled sets (`--dataset`), scored for memorization first, then a seeded sample of
`--per-group` probes of each set (memorized idioms, non-memorized idioms, ordinary text);
`--demo` uses the inline demo idioms and sentences of experiments/knockouts.py instead.

Writes under --out: attention_knockout*.parquet (rows, probes, summary per set x source x layer
with n and 95% bootstrap intervals) and its descriptor, attention_knockout_summary.csv, the
figure attention_knockout (HTML, PNG) and attention_knockout_settings.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knockouts import demo_probes  # noqa: E402


def main() -> None:
    from idiom_lens.analyses.interventions.attention_knockouts import (
        SOURCES,
        AttentionKnockoutOptions,
        attention_knockout,
    )
    from idiom_lens.analyses.memorization import score_memorization
    from idiom_lens.datasets import load_probes
    from idiom_lens.io import write_json, write_text
    from idiom_lens.models.loading import load_model
    from idiom_lens.plots.attention_knockout import attention_knockout_curves
    from idiom_lens.plots.export import save_figure
    from idiom_lens.study.run import sample_by_group

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--dataset", nargs="+", default=["idioms", "text"])
    parser.add_argument("--per-group", type=int, default=50,
                        help="seeded sample per set after memorization (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument("--demo", action="store_true", help="use the inline demo idioms and sentences")
    args = parser.parse_args()

    started = time.perf_counter()
    model = load_model(args.model)
    if args.demo:
        probes = demo_probes()
    else:
        pool = [p for name in args.dataset for p in load_probes(name)]
        memo = score_memorization(model, pool, batch_size=32)
        probes = sample_by_group(memo, pool, per_group=args.per_group, seed=args.seed)
    options = AttentionKnockoutOptions(sources=tuple(args.sources), window=args.window)
    result = attention_knockout(model, probes, options, batch_size=args.batch_size, progress=True)
    result.save(args.out)
    write_text(args.out / "attention_knockout_summary.csv", result.summary().to_csv(index=False))
    save_figure(attention_knockout_curves(result), args.out / "attention_knockout", png=not args.no_png,
                width=1300, height=520)
    write_json(args.out / "attention_knockout_settings.json", result.settings)
    n_group = result.probes["group"].value_counts().to_dict()
    print(f"{len(probes)} probes {n_group}: {result.settings['seconds']:.0f} s knocking out; "
          f"total {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

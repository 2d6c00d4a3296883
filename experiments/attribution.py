"""Per-layer direct logit attribution per set (memorized / non-memorized idioms, ordinary text, facts).

Reproduces the attribution figure and tables from the library:
    python experiments/attribution.py --model gemma-3-270m --dataset idioms --limit 200 --out out/attribution
Several datasets can be given (e.g. --dataset idioms text facts); they are attributed together.
Writes attribution*.parquet, layer_stats_*.parquet, cumulative_share_*.parquet, layers_*.html/png,
neurons_*.html/png and summary.json (see `idiom_lens.study.stages.run_attribution`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--dataset", nargs="+", default=["idioms", "text"], help="bundled names or files")
    parser.add_argument("--limit", type=int, default=200, help="probes per dataset (0 = all)")
    parser.add_argument("--out", type=Path, default=Path("out/attribution"))
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)

    from idiom_lens.datasets import load_probes
    from idiom_lens.models.loading import load_model
    from idiom_lens.study.stages import run_attribution

    probes = []
    for spec in args.dataset:
        part = list(load_probes(spec))
        probes += part[: args.limit] if args.limit else part
    model = load_model(args.model, mode="compat")
    digest = run_attribution(model, probes, args.out, batch_size=args.batch_size)
    for row in digest["component_shares"]["logit"]:
        print(row)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

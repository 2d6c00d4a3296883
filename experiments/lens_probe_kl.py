"""Where the lenses are read: KL(model's output || lens) at the probes' last prompt token, per layer,
for the logit lens and each cached learned lens, and the tuned lens's training curve.

    python experiments/lens_probe_kl.py --model gemma-3-270m --out out/lens-probe-kl [--per-set 100]

The lens's own held-out KL is measured on running text (NLTK's lee.cor plus one model-written
sample); the analyses read the lens at each probe's last prompt token, so this measures it there,
on a seeded sample of `--per-set` probes of each memorization set (idioms, text, facts). Learned
lenses come from the cache (`idiom-lens lens train`), never trained here. Writes probe_kl.parquet
(lens, layer, kl, kl_low, kl_high, n_probes), probe_kl.md, training_curve.parquet (empty for a lens
cached before curves were recorded) and the figure probe_kl (HTML + PNG).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-set", type=int, default=100, help="probes per memorization set (default 100)")
    parser.add_argument("--lens", nargs="+", default=["tuned", "jacobian"], choices=("tuned", "jacobian"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-png", action="store_true")
    args = parser.parse_args(argv)

    import pandas as pd
    import plotly.express as px

    from idiom_lens.analyses.memorization import score_memorization
    from idiom_lens.datasets import load_probes
    from idiom_lens.io import write_parquet, write_text
    from idiom_lens.lenses.cache import obtain_lens
    from idiom_lens.lenses.train import probe_kl, training_curve
    from idiom_lens.models.loading import load_model
    from idiom_lens.plots.export import save_figure
    from idiom_lens.study.run import sample_by_group
    from idiom_lens.study.text import markdown_table

    model = load_model(args.model)
    pool = [p for name in ("idioms", "text", "facts") for p in load_probes(name)]
    memo = score_memorization(model, pool, batch_size=32)
    probes = sample_by_group(memo, pool, per_group=args.per_set, seed=args.seed)
    tables, curves = [], []
    for kind in args.lens:
        lens = obtain_lens(model, kind, train=False)
        table = probe_kl(model, lens, probes, seed=args.seed)
        tables.append(table if not tables else table[table["lens"] != "logit"])
        curves.append(training_curve(lens).assign(lens=kind))
        print(f"{kind}: done", flush=True)
    table = pd.concat(tables, ignore_index=True)
    write_parquet(args.out / "probe_kl.parquet", table)
    write_text(args.out / "probe_kl.md", markdown_table(table) + "\n")
    write_parquet(args.out / "training_curve.parquet", pd.concat(curves, ignore_index=True))
    fig = px.line(table, x="layer", y="kl", color="lens", log_y=True, markers=True,
                  title=f"KL(output || lens) at the probes' last prompt token, {model.name} "
                        f"(n = {int(table['n_probes'].max())})")
    save_figure(fig, args.out / "probe_kl", png=not args.no_png, width=900, height=450)
    print(markdown_table(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

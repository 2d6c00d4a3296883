"""Is the two-phase finding a logit-lens artefact? The trajectory of memorized vs non-memorized
idioms vs ordinary text under the logit, tuned and Jacobian lenses, side by side.

    python experiments/lenses.py --model gemma-3-270m --out out/lenses
    python experiments/lenses.py --model smollm2-135m --out out/lenses-smollm2
    python experiments/lenses.py --lens tuned --limit 200     # one learned lens, a quicker look

Trains each learned lens into the cache when it is missing (`idiom-lens lens train`; about 10
minutes each on 2 cores, never on a probe), then writes, under OUT, what the study's lenses stage
writes: lens_trajectories.{html,png} (one column per lens), heldout_kl.{html,png}, the tables
lens_promotion / lens_tests / lens_boundaries / lens_heldout_kl (.parquet), summary.md, and each
lens's own trajectory folder (OUT/<lens>/). Resumable.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--dataset", nargs="+", default=["idioms", "text"], help="bundled names")
    parser.add_argument("--lens", nargs="+", default=["tuned", "jacobian"], choices=("tuned", "jacobian"))
    parser.add_argument("--limit", type=int, default=None, help="first N probes of each set")
    parser.add_argument("--out", type=Path, default=Path("out/lenses"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from idiom_lens.datasets.selection import join_probe_sets
    from idiom_lens.models.loading import load_model
    from idiom_lens.study.stages import run_lenses
    from idiom_lens.study.text import markdown_table

    probes = join_probe_sets(args.dataset, limit=args.limit)
    model = load_model(args.model, device=args.device)
    comparison = run_lenses(model, probes.probes, args.out, lenses=tuple(args.lens))
    print(comparison.summary_text())
    print()
    print(markdown_table(comparison.boundaries))
    print()
    print(markdown_table(comparison.promotion))
    print()
    tests = comparison.tests[comparison.tests["control"] == "all probes"]
    print(markdown_table(tests[["lens", "versus", "mean_diff", "mean_diff_low", "mean_diff_high", "p_value"]]))
    if comparison.heldout_kl is not None:
        print()
        print(markdown_table(comparison.heldout_kl.pivot(index="layer", columns="lens", values="kl").reset_index()))
    print(f"figure: {args.out / 'lens_trajectories.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

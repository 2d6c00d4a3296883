"""The paper's main figure and table: the recall trajectory of memorized vs non-memorized idioms
vs ordinary text (and facts), with the two phases.

    python experiments/trajectory.py --model gemma-3-270m --out out/trajectory
    python experiments/trajectory.py --limit 300          # a quicker look

Writes trajectory.{html,png} (figure: probability and rank of the predicted token per layer, mean
with 95% bands, phase boundary), promotion_layers.{html,png}, the memorization table
(memorization_summary.parquet, also in summary.md) and the phase table (summary.md). Resumable.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--dataset", nargs="+", default=["idioms", "text", "facts"], help="bundled names")
    parser.add_argument("--limit", type=int, default=None, help="first N probes of each set")
    parser.add_argument("--out", type=Path, default=Path("out/trajectory"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from idiom_lens.datasets.selection import join_probe_sets
    from idiom_lens.models.loading import load_model
    from idiom_lens.study.stages import resumable_trajectory, write_trajectory_outputs
    from idiom_lens.study.text import markdown_table

    probes = join_probe_sets(args.dataset, limit=args.limit)
    model = load_model(args.model, device=args.device)
    result = resumable_trajectory(model, probes.probes, args.out, sites=["resid_post"])
    outputs = write_trajectory_outputs(result, args.out, title=f"{model.spec}: recall trajectory")
    print(markdown_table(result.memorization.summary()))
    print()
    print(markdown_table(outputs.phases.group_table()))
    print()
    print(outputs.phases.summary_text)
    print(f"figure: {args.out / 'trajectory.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Ground truth for the localizers (issue 25): implant the bundled implanted idioms into an early, a
middle and a late MLP layer (2 seeds each), run every localizer on them and score how well each
finds the implanted layer, beside two controls (the same idioms on the base model; memorized
bundled idioms on the implanted model).

    python experiments/ground_truth.py --out out/ground-truth [--model gemma-3-270m] [--layers 2 8 14]
        [--seeds 0 1] [--n-scored 20] [--n-control 10] [--implant-mode layer] [--neurons-only]

The library does the work (`idiom_lens.study.ground_truth`; `idiom-lens localize` is the same from
the command line). Resumable: each implant is stored in the model cache and reused, each
localizer stage under OUT/L<layer>-s<seed>/ is reused when unchanged. Writes under --out:
implants.parquet (share of the implanted idioms predicted, epochs, training time),
side_effects.parquet (held-out KL on ordinary text, the bundled idioms' memorization before and
after), localization.parquet / .md (per set, measure and depth: the score of the implanted layer
with its interval), localization_*_per_probe/profile.parquet, the figures localization_scores and
localization_profiles (HTML + PNG), settings.json with the time of each part.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from idiom_lens.study.ground_truth import GroundTruthOptions

    defaults = GroundTruthOptions()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="default: 2 8 14 of 18 (same depths)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds))
    parser.add_argument("--implant-mode", choices=("layer", "neurons"), default=defaults.mode)
    parser.add_argument("--n-scored", type=int, default=defaults.n_scored)
    parser.add_argument("--n-control", type=int, default=defaults.n_control)
    parser.add_argument("--neurons-only", action="store_true",
                        help="neurons mode: implants, side effects and neuron precision only (no layer localizers)")
    parser.add_argument("--no-png", action="store_true")
    parser.add_argument("--rescore", action="store_true", help="no model: score the results saved under --out")
    args = parser.parse_args(argv)

    from idiom_lens.study.ground_truth import run_ground_truth, score_ground_truth
    from idiom_lens.study.text import markdown_table

    if args.rescore:
        table = score_ground_truth(args.out, png=not args.no_png)
    else:
        options = GroundTruthOptions(layers=args.layers, seeds=tuple(args.seeds), mode=args.implant_mode,
                                     n_scored=args.n_scored, n_control=args.n_control,
                                     layer_localizers=not args.neurons_only)
        table = run_ground_truth(args.model, args.out, options, png=not args.no_png)
    depth = table[table["scope"] == "depth"]
    print(markdown_table(depth[["set", "measure", "depth", "n", "score", "score_low", "score_high",
                                "profile_top_layer"]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

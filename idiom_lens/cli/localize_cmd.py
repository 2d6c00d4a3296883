"""`idiom-lens localize --out DIR`: the ground-truth benchmark of the localizers. Implants the
implanted idioms into an early, a middle and a late MLP layer (each implant reused from the model
cache), runs every localizer on them and scores how well each finds the implanted layer
(`idiom_lens.study.ground_truth`). `--rescore` redraws the scores from DIR without a model."""

from __future__ import annotations

import argparse

from idiom_lens.cli.common import add_model_options, add_output_options


def register(sub: argparse._SubParsersAction) -> None:
    from idiom_lens.study.ground_truth import GroundTruthOptions

    defaults = GroundTruthOptions()
    p = sub.add_parser("localize", help="ground truth for the localizers: implant new idioms into chosen MLP layers, "
                                        "run every localizer, score how well each finds the layer")
    add_model_options(p)
    add_output_options(p)
    p.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                   help="the implanted layers (default: an early, a middle and a late one: 2 8 14 of 18)")
    p.add_argument("--seeds", type=int, nargs="+", default=list(defaults.seeds), metavar="S",
                   help=f"implant seeds per layer (default {' '.join(map(str, defaults.seeds))})")
    p.add_argument("--implant-mode", choices=("layer", "neurons"), default=defaults.mode,
                   help="train the whole MLP of the layer, or a seeded subset of its neurons (default layer)")
    p.add_argument("--implant-set", default=defaults.dataset, metavar="NAME|PATH",
                   help=f"the probe set implanted (default {defaults.dataset})")
    p.add_argument("--n-scored", type=int, default=defaults.n_scored, metavar="N",
                   help=f"implanted idioms every localizer runs on, per implant (default {defaults.n_scored})")
    p.add_argument("--n-control", type=int, default=defaults.n_control, metavar="N",
                   help="memorized bundled idioms run on each depth's first implant, as a control "
                        f"(default {defaults.n_control})")
    p.add_argument("--neurons-only", action="store_true",
                   help="with --implant-mode neurons: only the implants, their side effects and the precision of "
                        "each neuron ranking against the trained neurons (no layer-level localizers)")
    p.add_argument("--rescore", action="store_true", help="no model: score and draw the results saved under --out")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.study.ground_truth import GroundTruthOptions, run_ground_truth, score_ground_truth
    from idiom_lens.study.text import markdown_table

    if args.rescore:
        table = score_ground_truth(args.out, png=not args.no_png)
    else:
        options = GroundTruthOptions(layers=args.layers, seeds=tuple(args.seeds), mode=args.implant_mode,
                                     dataset=args.implant_set, n_scored=args.n_scored, n_control=args.n_control,
                                     layer_localizers=not args.neurons_only)
        table = run_ground_truth(args.model, args.out, options, png=not args.no_png)
    shown = table[(table["scope"] == "depth") & (table["set"] == "implanted")]
    print(markdown_table(shown[["measure", "depth", "n", "score", "score_low", "score_high", "profile_top_layer"]]))
    precision = args.out / "neuron_precision.parquet"
    if precision.is_file():
        import pandas as pd

        print(markdown_table(pd.read_parquet(precision)[["implant", "method", "k", "n", "precision", "precision_low",
                                                          "precision_high", "chance_precision"]]))
    print(f"wrote the scores and figures to {args.out}")
    return 0

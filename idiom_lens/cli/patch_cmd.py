"""`idiom-lens patch`: activation patching from an idiom prompt into corrupted versions of it.

`idiom-lens patch --dataset idioms --sample 20 --out DIR` patches a set (parquet + mean heatmaps per
set + summary.json); `idiom-lens patch "once in a blue moon"` patches one sequence (its last word
is the target) and prints where the target's logit is restored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from idiom_lens.cli.common import (
    add_batch_size_option,
    add_model_options,
    add_output_options,
    add_probe_options,
    load_from_args,
    select_probes,
)
from idiom_lens.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "patch",
        help="activation patching: restore the target logit from the clean idiom into a corrupted prompt",
        description="Corrupt each prompt (one word swapped; or all but the last words replaced) keeping its token "
        "length, patch the clean residual stream, attention and MLP outputs per layer and position into the "
        "corrupted run, and report the restored share of the target logit.",
    )
    p.add_argument("text", nargs="?", default=None, help="one sequence to patch; its last word is the target")
    add_probe_options(p, required=False)
    add_model_options(p)
    p.add_argument("--variants", nargs="+", choices=("word_swap", "prefix_swap"), default=["word_swap", "prefix_swap"])
    p.add_argument("--keep-last", type=int, default=2, help="words kept by prefix_swap (default 2)")
    add_batch_size_option(p, default=64)
    add_output_options(p, required=False, note="required with --dataset; with TEXT, heatmaps are written only if given")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    from idiom_lens.datasets.probes import Probe
    from idiom_lens.analyses.interventions import patch_probes
    from idiom_lens.io import write_json
    from idiom_lens.plots.export import save_figure
    from idiom_lens.plots.interventions import patching_heatmaps

    if (args.text is None) == (args.dataset is None):
        raise InputError("give either TEXT (one sequence) or --dataset NAME|PATH, not both or neither")
    if args.text is not None:
        words = args.text.split()
        if len(words) < 2:
            raise InputError(f"TEXT {args.text!r} needs at least two words: a prompt and a target word")
        probes = [Probe(id="text", prompt=" ".join(words[:-1]), target=words[-1], kind="idiom")]
    else:
        if args.out is None:
            raise InputError("--out DIR is required with --dataset")
        probes = select_probes(args)
    model = load_from_args(args)
    if args.text is None:
        from idiom_lens.study.stages import run_patching

        result = run_patching(model, probes, args.out, variants=args.variants, seed=args.seed,
                              keep_last=args.keep_last, batch_size=args.batch_size, png=not args.no_png)
        for row in result.skipped.itertuples():
            print(f"skipped {row.probe_id} ({row.variant}): {row.reason}")
        print(f"{len(result.pairs)} pairs patched in {result.settings['seconds']:.1f} s; results in {args.out}")
        return 0
    result = patch_probes(model, probes, variants=args.variants, seed=args.seed, keep_last=args.keep_last,
                          batch_size=args.batch_size, progress=True)
    for row in result.skipped.itertuples():
        print(f"skipped {row.probe_id} ({row.variant}): {row.reason}")
    if result.pairs.empty:
        raise InputError("no probe could be corrupted at the same token length; nothing to patch")
    frame = result.to_dataframe()
    for pair in result.pairs.itertuples():
        print(f"[{pair.variant}] clean {pair.clean_prompt!r} -> target {pair.target!r} "
              f"(logit {pair.clean_logit:.2f}, predicts {pair.clean_pred_token!r}); corrupted "
              f"{pair.corrupted_prompt!r} (logit {pair.corrupted_logit:.2f}, predicts {pair.corrupted_pred_token!r})")
        if not pair.valid:
            print("  clean and corrupted target logits barely differ: nothing to restore")
            continue
        part = frame[(frame["variant"] == pair.variant)]
        for site in result.settings["sites"]:
            s = part[part["site"] == site].nlargest(3, "restored")
            cells = ", ".join(f"layer {r.layer} pos {r.pos} {r.clean_token!r}: {r.restored:.2f}" for r in s.itertuples())
            print(f"  {site:9s} most restoring: {cells}")
    if args.out is not None:  # one sequence: its heatmaps
        out: Path = args.out
        result.save(out)
        write_json(out / "summary.json", result.settings | {"skipped": result.skipped.to_dict(orient="records")})
        for variant in args.variants:
            valid = result.pairs[(result.pairs["variant"] == variant) & result.pairs["valid"]]
            for pid in valid["probe_id"]:
                save_figure(patching_heatmaps(result, variant=variant, probe_id=pid),
                            out / f"patching_{variant}", png=not args.no_png, width=1300, height=600)
        print(f"{len(result.pairs)} pairs patched in {result.settings['seconds']:.1f} s; results in {out}")
    return 0

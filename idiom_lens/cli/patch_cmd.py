"""`idiom-lens patch`: activation patching from an idiom prompt into corrupted versions of it.

`idiom-lens patch --dataset idioms --sample 20 --out DIR` patches a set (parquet + mean heatmaps per
set + summary.json); `idiom-lens patch "once in a blue moon"` patches one sequence (its last word
is the target) and prints where the target's logit is restored.

`--method attribution` estimates the same numbers by attribution patching (one forward and one
backward per pair instead of one forward per cell) and writes the same files; `--method both`
runs both on the same pairs (the attribution files under DIR/attribution/) and writes how well
they agree (`agreement.parquet`, `agreement_summary.csv`).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from idiom_lens.cli.common import (
    add_batch_size_option,
    add_model_options,
    add_output_options,
    add_probe_options,
    add_worker_options,
    executor,
    load_from_args,
    named_options,
    text_or_dataset_probes,
)
from idiom_lens.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    from idiom_lens.analyses.interventions.patching import METHODS, PATCH_SITES, VARIANTS, PatchingOptions

    defaults = PatchingOptions()
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
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(defaults.corruption.variants),
                   help="word_swap: one word replaced; prefix_swap: every word but the last --keep-last replaced "
                        f"(default {' '.join(defaults.corruption.variants)})")
    p.add_argument("--keep-last", type=int, default=defaults.corruption.keep_last,
                   help=f"words kept by prefix_swap (default {defaults.corruption.keep_last})")
    p.add_argument("--sites", nargs="+", choices=PATCH_SITES, default=list(defaults.sites),
                   help=f"what is patched (default {' '.join(defaults.sites)})")
    p.add_argument("--method", choices=(*METHODS, "both"), default=defaults.method,
                   help="exact: one patched run per site, layer and position; attribution: the gradient estimate, "
                   "one forward and one backward per pair; both: each on the same pairs, plus their agreement "
                   f"(default {defaults.method})")
    add_batch_size_option(p, default=64)
    add_output_options(p, required=False, note="required with --dataset; with TEXT, heatmaps are written only if given")
    add_worker_options(p)
    p.set_defaults(handler=_run)


def patching_options(args: argparse.Namespace, method: str) -> Any:
    """The `PatchingOptions` of the command line for `method` (`InputError` for a bad value)."""
    from idiom_lens.analyses.interventions.patching import CorruptionOptions, PatchingOptions

    corruption = named_options(
        lambda: CorruptionOptions(variants=tuple(args.variants), seed=args.seed, keep_last=args.keep_last),
        {"keep_last": "--keep-last", "variants": "--variants"})
    return PatchingOptions(corruption=corruption, sites=tuple(args.sites), method=method)


def _run(args: argparse.Namespace) -> int:
    for method in _methods(args):
        patching_options(args, method)  # InputError before the model loads
    probes = text_or_dataset_probes(args)
    model = load_from_args(args)
    return _run_set(args, model, probes) if args.text is None else _run_text(args, model, probes)


def _methods(args: argparse.Namespace) -> list[str]:
    return ["exact", "attribution"] if args.method == "both" else [args.method]


def _folder(args: argparse.Namespace, method: str) -> Path:
    """Where `method`'s files go: --out, or --out/attribution for the estimate beside exact patching."""
    return args.out / "attribution" if args.method == "both" and method == "attribution" else args.out


def _patch(args: argparse.Namespace, model: Any, probes: list, method: str) -> Any:
    from idiom_lens.analyses.interventions import patch

    return patch(model, probes, patching_options(args, method), batch_size=args.batch_size, progress=True)


def _agreement(results: dict[str, Any], out: Path | None) -> None:
    """Print (and with `out`, write) how attribution patching agrees with exact patching."""
    from idiom_lens.analyses.interventions.attribution_patching import patching_agreement
    from idiom_lens.io import write_text

    agreement = patching_agreement(results["exact"], results["attribution"])
    table = agreement.summary()
    exact_s, approx_s = results["exact"].settings["seconds"], results["attribution"].settings["seconds"]
    print(f"attribution vs exact patching ({agreement.settings['n_valid_pairs']} valid pairs; per pair: Pearson "
          f"correlation over layer x position cells, top-{agreement.settings['top']} overlap by |restored|, means "
          f"with 95% bootstrap intervals; exact {exact_s:.1f} s, attribution {approx_s:.1f} s):")
    print(table.round(3).to_string(index=False))
    if out is not None:
        agreement.save(out)
        write_text(out / "agreement_summary.csv", table.to_csv(index=False))


def _run_set(args: argparse.Namespace, model: Any, probes: list) -> int:
    with executor(args, model) as where:
        return _run_methods(args, model, probes, where)


def _run_methods(args: argparse.Namespace, model: Any, probes: list, where: Any) -> int:
    results: dict[str, Any] = {}
    for method in _methods(args):
        from idiom_lens.study.stages import run_patching

        folder = _folder(args, method)
        result = run_patching(model, probes, folder, options=patching_options(args, method),
                              batch_size=args.batch_size, png=not args.no_png, executor=where)
        if not results:
            for row in result.skipped.itertuples():
                print(f"skipped {row.probe_id} ({row.variant}): {row.reason}")
        results[method] = result
        print(f"{len(result.pairs)} pairs patched ({method}) in {result.settings['seconds']:.1f} s; "
              f"results in {folder}")
    if args.method == "both":
        _agreement(results, args.out)
    return 0


def _run_text(args: argparse.Namespace, model: Any, probes: list) -> int:
    from idiom_lens.io import write_json
    from idiom_lens.plots.export import save_figure
    from idiom_lens.plots.interventions import patching_heatmaps

    results = {method: _patch(args, model, probes, method) for method in _methods(args)}
    first = next(iter(results.values()))
    for row in first.skipped.itertuples():
        print(f"skipped {row.probe_id} ({row.variant}): {row.reason}")
    if first.pairs.empty:
        raise InputError("no probe could be corrupted at the same token length; nothing to patch")
    for method, result in results.items():
        if args.method == "both":
            print(f"== {method} patching")
        frame = result.to_dataframe()
        for pair in result.pairs.itertuples():
            print(f"[{pair.variant}] clean {pair.clean_prompt!r} -> target {pair.target!r} "
                  f"(logit {pair.clean_logit:.2f}, predicts {pair.clean_pred_token!r}); corrupted "
                  f"{pair.corrupted_prompt!r} (logit {pair.corrupted_logit:.2f}, "
                  f"predicts {pair.corrupted_pred_token!r})")
            if not pair.valid:
                print("  clean and corrupted target logits barely differ: nothing to restore")
                continue
            part = frame[(frame["variant"] == pair.variant)]
            for site in result.settings["sites"]:
                s = part[part["site"] == site].nlargest(3, "restored")
                cells = ", ".join(f"layer {r.layer} pos {r.pos} {r.clean_token!r}: {r.restored:.2f}"
                                  for r in s.itertuples())
                print(f"  {site:9s} most restoring: {cells}")
    for method, result in results.items():
        if args.out is None:  # one sequence: heatmaps only with --out
            continue
        out = _folder(args, method)
        result.save(out)
        write_json(out / "summary.json", result.settings | {"skipped": result.skipped.to_dict(orient="records")})
        for variant in result.settings["variants"]:
            valid = result.pairs[(result.pairs["variant"] == variant) & result.pairs["valid"]]
            for pid in valid["probe_id"]:
                save_figure(patching_heatmaps(result, variant=variant, probe_id=pid),
                            out / f"patching_{variant}", png=not args.no_png, width=1300, height=600)
        print(f"{len(result.pairs)} pairs patched ({method}) in {result.settings['seconds']:.1f} s; results in {out}")
    if args.method == "both":
        _agreement(results, args.out)
    return 0

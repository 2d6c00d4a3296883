"""`idiom-lens data`: list, show, export and rebuild probe sets."""

from __future__ import annotations

import argparse
import filecmp
import tempfile
from pathlib import Path

from idiom_lens.cli.common import add_limit_option, add_model_options, add_output_options, load_from_args
from idiom_lens.datasets.loaders import bundled_dir, bundled_names, bundled_path, export_probes, load_probes
from idiom_lens.datasets.probes import FLAG_NAMES, ProbeSet
from idiom_lens.errors import InputError
from idiom_lens.models.loading import EMBEDDED_SPEC

_SHORT_FLAGS = {"similarity_ind": "sim", "prompt_comp_ind": "comp", "frequent_target_ind": "rare",
                "hard_to_guess": "hard", "single_target": "single"}
_SHOWN_FLAGS = (*FLAG_NAMES, "single_target")  # per-probe columns of `data show`
_COUNTED = (*FLAG_NAMES, "not_single_target")  # keys of `ProbeSet.flag_counts`, columns of `data list`


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("data", help="list, show, export and rebuild probe sets")
    sub = parser.add_subparsers(dest="data_command", required=True, metavar="ACTION")

    p = sub.add_parser("list", help="bundled probe sets: sizes, flag counts, probes not single-target")
    p.set_defaults(handler=_list)

    p = sub.add_parser("show", help="print probes of a bundled set or a file as a table")
    p.add_argument("spec", metavar="NAME|PATH")
    add_limit_option(p)
    p.add_argument("--kind", choices=("idiom", "fact", "text"), default=None, help="kind for rows without one")
    p.set_defaults(handler=_show)

    p = sub.add_parser("export", help="write a set or file to .jsonl or .csv")
    p.add_argument("spec", metavar="NAME|PATH")
    p.add_argument("out_path", metavar="OUT_PATH", type=Path, help="the file to write (.jsonl or .csv)")
    p.add_argument("--kind", choices=("idiom", "fact", "text"), default=None, help="kind for rows without one")
    p.set_defaults(handler=_export)

    p = sub.add_parser("build", help="re-run the builders that write the bundled sets (needs the build-data extra)")
    add_output_options(p, required=False, png=False,
                       note="default: the package's data folder; with --check, the folder compared with")
    p.add_argument("--check", action="store_true",
                   help="build into a temporary folder and compare with the bundled files")
    p.add_argument("--implanted", action="store_true",
                   help="build the implanted idioms (implanted.jsonl) instead: new idioms whose target is not in "
                        "the top 10 of --model before implanting (loads the model)")
    add_model_options(p)
    p.set_defaults(handler=_build)


def _flag_cell(value: bool | None) -> str:
    return "-" if value is None else ("1" if value else "0")


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _list(args: argparse.Namespace) -> int:
    rows = []
    for name in bundled_names():
        probes = load_probes(name)
        counts = probes.flag_counts()
        rows.append([name, str(len(probes)), *(str(counts[f]) for f in _COUNTED), str(bundled_path(name))])
    _print_table(["name", "probes", *_COUNTED, "file"], rows)
    return 0


def _show(args: argparse.Namespace) -> int:
    probes: ProbeSet = load_probes(args.spec, kind=args.kind)
    shown = probes.probes[: args.limit]
    rows = [
        [p.id, p.kind, _clip(p.prompt, 60), p.target, *(_flag_cell(getattr(p, f)) for f in _SHOWN_FLAGS)] for p in shown
    ]
    _print_table(["id", "kind", "prompt", "target", *(_SHORT_FLAGS[f] for f in _SHOWN_FLAGS)], rows)
    not_single = probes.flag_counts()["not_single_target"]
    print(f"({len(shown)} of {len(probes)} probes from {probes.name}; {not_single} not single-target "
          "(prompt shared with another target; never hard_to_guess); flags: 1 true, 0 false, - unknown; "
          "sim=similarity_ind comp=prompt_comp_ind rare=frequent_target_ind hard=hard_to_guess single=single_target)")
    return 0


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _export(args: argparse.Namespace) -> int:
    probes = load_probes(args.spec, kind=args.kind)
    path = export_probes(probes, args.out_path)
    print(f"wrote {len(probes)} probes to {path}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from idiom_lens.datasets import build

    missing = build.missing_build_packages()
    if missing:
        raise InputError(
            f"building the bundled sets needs the build-time packages {', '.join(missing)} "
            "(install them with: pip install 'idiom-lens[build-data]')"
        )
    if not args.implanted and (args.model != EMBEDDED_SPEC or args.device != "cpu" or args.n_devices is not None):
        raise InputError("--model, --device and --n-devices only apply with --implanted (the other sets need no model)")
    build_sets = (lambda out: _build_implanted(args, out)) if args.implanted else build.build_all
    if not args.check:
        out = args.out or bundled_dir()
        for name, path in build_sets(out).items():
            print(f"wrote {name}: {path}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        built = build_sets(tmp)
        reference = args.out or bundled_dir()
        differ = [name for name, path in built.items() if not (reference / path.name).is_file()
                  or not filecmp.cmp(path, reference / path.name, shallow=False)]
    if differ:
        print(f"differs from {reference}: {', '.join(differ)}")
        return 1
    print(f"bundled sets in {reference} are reproduced byte for byte: {', '.join(built)}")
    return 0


def _build_implanted(args: argparse.Namespace, out: Path | str) -> dict[str, Path]:
    """`implanted.jsonl` (the defaults of `build_implanted`: 120 idioms, seed 0) checked on `--model`."""
    import statistics

    from idiom_lens.analyses.implant_check import build_implanted
    from idiom_lens.datasets.implanted import NAME, write_implanted

    model = load_from_args(args)
    records = build_implanted(model)
    ranks = [r["base_rank"] for r in records]
    print(f"{len(records)} implanted idioms; base rank on {model.spec}: min {min(ranks)}, "
          f"median {statistics.median(ranks):g}")
    return {NAME: write_implanted(records, out)}

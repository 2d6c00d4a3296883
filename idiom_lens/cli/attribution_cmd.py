"""`idiom-lens attribution --dataset NAME|PATH --out DIR`: attribution of a probe set, with figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from idiom_lens.cli.common import add_model_options, load_from_args
from idiom_lens.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "attribution", help="direct logit attribution of a probe set: parquet, figures and a summary JSON"
    )
    p.add_argument("--dataset", required=True, metavar="NAME|PATH", help="bundled set name or probe file")
    add_model_options(p)
    p.add_argument("--limit", type=int, default=0, metavar="N", help="first N probes only (0 = all)")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    p.add_argument("--top", type=int, default=20, metavar="N", help="top neurons per probe and per set (default 20)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N")
    p.add_argument("--no-png", action="store_true", help="write HTML figures only")
    p.set_defaults(handler=_attribution)


def _attribution(args: argparse.Namespace) -> int:
    from idiom_lens.datasets import load_probes
    from idiom_lens.study.pipeline import run_attribution

    if args.limit < 0:
        raise InputError(f"--limit must be >= 0, got {args.limit}")
    probes = list(load_probes(str(args.dataset)))
    if args.limit:
        probes = probes[: args.limit]
    if not probes:
        raise InputError(f"dataset {args.dataset!r} has no probes")
    model = load_from_args(args, mode="compat")
    digest = run_attribution(model, probes, args.out, top=args.top, batch_size=args.batch_size, png=not args.no_png)
    print(f"attributed {digest['n_probes']} probes: {digest['group_counts']}")
    for row in digest["component_shares"]["logit"]:
        print(f"  {row['group']:<22} n={row['n']:<4} attn {row['attn_share']:+.2f}  mlp {row['mlp_share']:+.2f} "
              f"[{row['mlp_share_lo']:+.2f}, {row['mlp_share_hi']:+.2f}]  "
              f"early mlp (first {row['early_layers']} layers) {row['early_mlp_share']:+.2f}  "
              f"half built by layer {row['half_built_at_layer']}")
    print(f"invariant max abs error: {digest['invariant_max_abs_error']}")
    print(f"wrote {len(digest['files']) + 1} files to {args.out}")
    return 0

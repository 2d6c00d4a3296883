"""`idiom-lens attribute-set --dataset NAME|PATH ... --out DIR`: direct logit attribution of a probe set, with figures.

Old name `attribution` (deprecated, kept one release). For one prompt see `attribute-prompt`.
"""

from __future__ import annotations

import argparse

from idiom_lens.cli.common import (
    add_batch_size_option,
    add_command,
    add_model_options,
    add_old_spelling,
    add_output_options,
    add_probe_options,
    default_of,
    load_from_args,
    select_probes,
)
from idiom_lens.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    from idiom_lens.study.stages import run_attribution

    p = add_command(
        subparsers, "attribute-set", old_name="attribution",
        help="direct logit attribution of a probe set: parquet, figures and a summary JSON",
    )
    add_probe_options(p)
    add_model_options(p)
    add_output_options(p)
    p.add_argument("--top-neurons", type=int, default=default_of(run_attribution, "top"), metavar="N",
                   help=f"top neurons kept per probe and per set (default {default_of(run_attribution, 'top')})")
    add_old_spelling(p, "--top", "--top-neurons", dest="top_neurons", type=int, metavar="N")
    add_batch_size_option(p, default=16)
    p.set_defaults(handler=_attribution)


def _attribution(args: argparse.Namespace) -> int:
    from idiom_lens.study.stages import run_attribution

    if args.top_neurons < 1:
        raise InputError(f"--top-neurons must be >= 1, got {args.top_neurons}")
    probes = select_probes(args)
    model = load_from_args(args, mode="compat")
    digest = run_attribution(model, probes, args.out, top=args.top_neurons, batch_size=args.batch_size,
                             png=not args.no_png)
    print(f"attributed {digest['n_probes']} probes: {digest['group_counts']}")
    for row in digest["component_shares"]["logit"]:
        print(f"  {row['group']:<22} n={row['n']:<4} attn {row['attn_share']:+.2f}  mlp {row['mlp_share']:+.2f} "
              f"[{row['mlp_share_low']:+.2f}, {row['mlp_share_high']:+.2f}]  "
              f"early mlp (first {row['early_layers']} layers) {row['early_mlp_share']:+.2f}  "
              f"half built by layer {row['half_built_at_layer']}")
    print(f"invariant max abs error: {digest['invariant_max_abs_error']}")
    print(f"wrote {len(digest['files']) + 1} files to {args.out}")
    return 0

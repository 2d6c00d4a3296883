"""Options and helpers shared by subcommands."""

from __future__ import annotations

import argparse
from typing import Any

from idiom_lens.models.loading import EMBEDDED_SPEC


def add_model_options(parser: argparse.ArgumentParser, *, mode: bool = False) -> None:
    parser.add_argument(
        "--model", default=EMBEDDED_SPEC,
        help=f"model spec: a name from `idiom-lens models`, a local HF directory, a .gguf file, "
        f"or a hub id (default: {EMBEDDED_SPEC})",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--n-devices", type=int, default=None,
                        help="split the model across this many GPUs (TransformerLens n_devices)")
    if mode:
        parser.add_argument(
            "--mode", choices=("raw", "compat"), default="raw",
            help="numerics: raw (= Hugging Face) or compat (folded norms, HookedTransformer numerics)",
        )


def load_from_args(args: argparse.Namespace, *, mode: str | None = None) -> Any:
    from idiom_lens.models.loading import load_model

    return load_model(args.model, mode=mode or getattr(args, "mode", "raw"), device=args.device,
                      n_devices=args.n_devices)


def print_frame(frame: Any, *, floatfmt: str = "{:.4f}") -> None:
    import pandas as pd

    with pd.option_context("display.max_rows", 200, "display.max_columns", 30, "display.width", 160,
                           "display.float_format", floatfmt.format):
        print(frame.to_string(index=False))

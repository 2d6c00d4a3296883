"""`idiom-lens models`: the specs idiom_lens knows, whether each is available, where cached."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list known model specs and their cache state")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.models.loading import cache_dir, known_specs

    print(f"cache: {cache_dir()}  (set IDIOM_LENS_CACHE to move it)")
    for info in known_specs():
        state = "available" if info.available else "not available"
        print(f"- {info.spec}: {info.description}\n    {state}; {info.location}"
              + (f"\n    get it: {info.how_to_get}" if info.how_to_get else ""))
    print("- any local Hugging Face model directory, local .gguf file, or hub id (where a hub is reachable)")
    return 0

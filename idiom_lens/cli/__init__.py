"""The `idiom-lens` command line: a thin layer over the library.

Each subcommand lives in its own module with a `register(subparsers)` function that adds
its parser and sets `handler`. The options several commands share (`--dataset`, `--limit`, `--sample`,
`--seed`, `--out`, `--no-png`, `--batch-size`, `--results`) come from `idiom_lens.cli.common` and mean
the same everywhere; they are checked before the handler runs. User mistakes (`InputError`) print one
line and exit 2, and so does a command whose output folder another process is writing (`idiom_lens.locks`);
a failed run-time self-check (`FastPathError`: a fast path disagrees with a full
forward) prints one line and exits 3.

Renamed commands (the old name works for one release, with a note on stderr):
`attribute` -> `attribute-prompt` (one prompt), `attribution` -> `attribute-set` (a probe set).
Renamed options (the old spelling works until 0.2, with a note on stderr: `common.add_old_spelling`):
trace `--samples` -> `--noise-samples`; knockout `--max-window N` -> `--windows 1 .. N` and
`--keep-top-max-window` -> `--keep-top-windows`; attn-knockout `--window` -> `--windows`;
attribute-prompt `--top` -> `--rows`; attribute-set `--top` -> `--top-neurons`.

Each command builds its analysis's options object (`KnockoutOptions`, `TracingOptions`, ...) and
reads its defaults and `choices` from it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from idiom_lens.errors import FastPathError, InputError

# Subcommand modules (idiom_lens.cli.<name>_cmd), in the order `idiom-lens --help` lists them. Module names
# are not command names: attribute_cmd registers `attribute-prompt`, attribution_cmd `attribute-set`.
_COMMANDS = ("models", "predict", "data", "trajectory", "lens", "attribute", "attribution", "knockout", "patch",
             "trace", "attn_knockout", "implant", "localize", "run", "compare", "report", "selfcheck")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(
        prog="idiom-lens",
        description="How transformers recall memorized sequences (idioms, facts): "
        "memorization, logit-lens trajectories, attributions, interventions.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        importlib.import_module(f"idiom_lens.cli.{name}_cmd").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import contextlib

    from idiom_lens.cli.common import check_shared_options, warn_if_old_name, written_folder
    from idiom_lens.locks import folder_lock

    parser = build_parser()
    args = parser.parse_args(argv)
    warn_if_old_name(args)
    try:
        check_shared_options(args)
        folder = written_folder(args)
        with folder_lock(folder) if folder is not None else contextlib.nullcontext():
            return int(args.handler(args) or 0)
    except InputError as err:
        print(f"idiom-lens {args.command}: error: {err}", file=sys.stderr)
        return 2
    except FastPathError as err:  # a shortcut disagrees with a full forward: stop, write nothing
        print(f"idiom-lens {args.command}: self-check failed: {err}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

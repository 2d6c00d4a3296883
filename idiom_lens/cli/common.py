"""Options and helpers shared by subcommands.

Every option below has one meaning in every command that takes it; a command gets it only through
these functions, never with its own `add_argument`:

- `--dataset NAME|PATH ...` (`add_probe_options`): bundled set names or probe files, joined;
- `--limit N` (`add_probe_options`, `add_limit_option`): only the first N probes of each set
  (N >= 1; absent: all);
- `--sample N` (`add_probe_options`): a seeded sample of N probes of each set, after `--limit`
  (N >= 1; absent: all);
- `--seed S` (`add_probe_options`, `add_seed_option`): the seed of every sample and random control
  (default 0);
- `--out DIR` (`add_output_options`): always a folder, created when missing;
- `--no-png` (`add_output_options`, `add_png_option`): skip static PNG figures (HTML and .fig.json
  are still written);
- `--batch-size N` (`add_batch_size_option`): sequences per forward pass (N >= 1); speed and
  memory only, never results;
- `--results DIR` (`add_results_option`): a results folder written by `idiom-lens run`;
- `--workers N`, `--ray-address ADDR|auto`, `--worker-threads N` (`add_worker_options`): run the
  sweep on N Ray workers (the `distributed` extra); speed only, never results;
- `--part-size N` (`add_part_size_option`): probes per resumable part (N >= 1).

A command's own options take their defaults (and `choices`) from its options object or the
analysis's constants, never from a literal written again here. A renamed option keeps its old
spelling for one release (`add_old_spelling`): it works and prints one line on stderr.

`check_shared_options` (run by `idiom_lens.cli.main` before every handler) validates them and
raises `InputError` with the same message in every command. The folder a command writes
(`written_folder`: `--out`, else `--results`) is locked for the handler's lifetime
(`idiom_lens.locks`): a second command writing there exits 2 naming the holder's PID.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from idiom_lens.errors import InputError
from idiom_lens.models.loading import EMBEDDED_SPEC

DATASET_HELP = ("probe sets: bundled names (idioms, text, facts, implanted) or probe files (our JSONL/CSV, or the "
                "authors' IdioMem JSONL as published); several are joined, ids must be unique across them")
LIMIT_HELP = "only the first N probes of each set (N >= 1; default: all)"
SAMPLE_HELP = ("a seeded sample of N probes of each set (each --dataset entry), taken after --limit, kept in "
               "file order (N >= 1; default: all)")
SEED_HELP = "seed of every sample and random control or corruption (default 0)"
OUT_HELP = "output folder, created when missing"
PNG_HELP = "skip static PNG figures (the HTML figures and their .fig.json are still written)"
BATCH_HELP = ("sequences per forward pass (a probe, or a probe under one knockout or patch; N >= 1); changes "
              "speed and memory, not results")
RESULTS_HELP = "results folder written by `idiom-lens run --out` (default: results/)"
WORKERS_HELP = ("run the sweep on N Ray workers, each holding the model (N >= 1; default: this process, no Ray); "
                "a local Ray is started for the run unless --ray-address is given; changes speed, not results "
                "(needs `pip install idiom-lens[distributed]`)")
RAY_ADDRESS_HELP = "an existing Ray cluster: 'auto' (the one started on this machine by `ray start`) or HOST:PORT"
WORKER_THREADS_HELP = "torch threads per worker (N >= 1; default: this machine's cores divided among the workers)"

# Options whose value must be a whole number >= 1 when given: dest -> (option, what N means).
_POSITIVE = {
    "limit": ("--limit", "the first N probes of each set; leave it out for all"),
    "sample": ("--sample", "a seeded sample of N probes of each set; leave it out for all"),
    "batch_size": ("--batch-size", "sequences per forward pass"),
    "workers": ("--workers", "Ray workers, each holding the model"),
    "worker_threads": ("--worker-threads", "torch threads per worker"),
    "probes_per_task": ("--probes-per-task", "probes per Ray task"),
    "part_size": ("--part-size", "probes per resumable part"),
}
# When the old spellings of renamed options (`add_old_spelling`) go.
OLD_SPELLINGS_GO_IN = "0.2"


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=EMBEDDED_SPEC,
        help=f"model spec: a name from `idiom-lens models`, a local HF directory, a .gguf file, "
        f"or a hub id (default: {EMBEDDED_SPEC})",
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--n-devices", type=int, default=None,
                        help="split the model across this many GPUs (TransformerLens n_devices)")


def add_probe_options(parser: argparse.ArgumentParser, *, required: bool = True,
                      default: Sequence[str] | None = None, sample: bool = True) -> None:
    """`--dataset`, `--limit`, `--seed` and (unless `sample=False`) `--sample`."""
    help_ = DATASET_HELP + (f" (default: {' '.join(default)})" if default else "")
    parser.add_argument("--dataset", nargs="+", required=required, default=list(default) if default else None,
                        metavar="NAME|PATH", help=help_)
    add_limit_option(parser)
    if sample:
        parser.add_argument("--sample", type=int, default=None, metavar="N", help=SAMPLE_HELP)
    add_seed_option(parser)


def add_limit_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=None, metavar="N", help=LIMIT_HELP)


def add_seed_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, metavar="S", help=SEED_HELP)


def add_output_options(parser: argparse.ArgumentParser, *, required: bool = True, default: Path | None = None,
                       note: str | None = None, png: bool = True) -> None:
    """`--out DIR` (always a folder) and, unless `png=False`, `--no-png`. `note` ends the help
    (e.g. when --out is needed); a default is shown."""
    extra = [note] if note else []
    if default is not None:
        extra.append(f"default: {default}/")
    parser.add_argument("--out", type=Path, required=required, default=default, metavar="DIR",
                        help=OUT_HELP + (f" ({'; '.join(extra)})" if extra else ""))
    if png:
        add_png_option(parser)


def add_png_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-png", action="store_true", help=PNG_HELP)


def add_batch_size_option(parser: argparse.ArgumentParser, *, default: int) -> None:
    parser.add_argument("--batch-size", type=int, default=default, metavar="N",
                        help=f"{BATCH_HELP} (default {default})")


def default_of(fn: Callable[..., Any], name: str) -> Any:
    """The default of `fn`'s argument `name`: a command shows (and uses) the library's default
    rather than writing it again."""
    import inspect

    return inspect.signature(fn).parameters[name].default


def add_part_size_option(parser: argparse.ArgumentParser, *, default: int, note: str = "") -> None:
    """`--part-size N`: probes per resumable part (a crash loses at most one part)."""
    parser.add_argument("--part-size", type=int, default=default, metavar="N",
                        help=f"probes per resumable part (default {default}); a crash loses at most one part{note}")


def add_old_spelling(parser: argparse.ArgumentParser, old: str, new: str, *, dest: str,
                     convert: Callable[[Any], Any] | None = None, **kwargs: Any) -> None:
    """`old` as a deprecated spelling of `new` for one release: it sets `dest` (through `convert`,
    when the old option meant something to translate, e.g. a bound into a list) and prints one
    line on stderr. Hidden from --help. Add it after `new` (so that `new`'s default stands)."""

    class OldSpelling(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                     option_string: str | None = None) -> None:
            print(f"idiom-lens: {old} is deprecated; use {new} (the old spelling goes in {OLD_SPELLINGS_GO_IN})",
                  file=sys.stderr)
            setattr(namespace, self.dest, convert(values) if convert is not None else values)

    parser.add_argument(old, dest=dest, action=OldSpelling, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                        **kwargs)


def named_options(build: Callable[[], Any], flags: dict[str, str]) -> Any:
    """`build()` (an options object), its `InputError` naming the command's options instead of the
    fields (`flags`: field -> --option), so that a bad value reads as the user typed it."""
    import re

    try:
        return build()
    except InputError as err:
        text = str(err)
        for field, flag in flags.items():
            text = re.sub(rf"(?<![\w-]){field}(?![\w-])", flag, text)
        raise InputError(text) from None


def add_worker_options(parser: argparse.ArgumentParser) -> None:
    """`--workers N`, `--ray-address ADDR|auto` and `--worker-threads N`: where a sweep runs."""
    parser.add_argument("--workers", type=int, default=None, metavar="N", help=WORKERS_HELP)
    parser.add_argument("--ray-address", default=None, metavar="ADDR", help=RAY_ADDRESS_HELP)
    parser.add_argument("--worker-threads", type=int, default=None, metavar="N", help=WORKER_THREADS_HELP)
    parser.add_argument("--probes-per-task", type=int, default=None, metavar="N",
                        help="probes per Ray task of the per-probe sweeps (default: two tasks per worker and part); "
                             "on a cluster, enough for a task to last a few seconds")


def worker_options(args: argparse.Namespace) -> Any:
    """The `idiom_lens.study.executors.WorkerOptions` of `--workers/--ray-address/--worker-threads`
    (`InputError` when they ask for Ray and it is not installed)."""
    from idiom_lens.study.workers import WorkerOptions

    return WorkerOptions(workers=getattr(args, "workers", None), address=getattr(args, "ray_address", None),
                         threads=getattr(args, "worker_threads", None),
                         probes_per_task=getattr(args, "probes_per_task", None))


def executor(args: argparse.Namespace, model: Any) -> Any:
    """A context manager giving where the sweeps run (`idiom_lens.study.executors`): this
    process, or the Ray workers of `--workers/--ray-address` (each loads `model` from its spec)."""
    from idiom_lens.study.executors import open_executor

    return open_executor(model, worker_options(args), device=args.device, n_devices=args.n_devices)


def add_results_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=Path("results"), metavar="DIR", help=RESULTS_HELP)


def check_shared_options(args: argparse.Namespace) -> None:
    """The shared options' rules, the same in every command: raise `InputError` on a bad value."""
    for dest, (option, meaning) in _POSITIVE.items():
        value = getattr(args, dest, None)
        if value is not None and value < 1:
            raise InputError(f"{option} must be a whole number >= 1 ({meaning}), got {value}")
    out = getattr(args, "out", None)
    if isinstance(out, Path) and out.exists() and not out.is_dir():
        raise InputError(f"--out must be a folder, but {out} is a file")
    if isinstance(out, Path) and out.suffix.lower() in (".html", ".htm") and not out.is_dir():
        # checked here, before `main` locks (and so creates) the folder
        hint = f" (the page is DIR/report.html; to name the file, use --html {out})" if hasattr(args, "html") else ""
        raise InputError(f"--out is a folder, not a page: {out}{hint}")
    if hasattr(args, "workers"):
        options = worker_options(args)  # InputError without Ray when it is needed
        device = getattr(args, "device", "cpu")
        if options.distributed and device.startswith("cuda:"):
            raise InputError(f"--device {device}: with --workers give --device cuda; Ray gives each worker its own "
                             "GPU(s) (--n-devices per worker)")


def text_or_dataset_probes(args: argparse.Namespace, *, min_words: int = 2) -> list:
    """The probes of a command that takes either TEXT (one sequence of at least `min_words` words,
    the last one the target) or `--dataset` (which then needs `--out`): `InputError` otherwise."""
    from idiom_lens.datasets.probes import Probe

    if (args.text is None) == (args.dataset is None):
        raise InputError("give either TEXT (one sequence) or --dataset NAME|PATH, not both or neither")
    if args.text is None:
        if args.out is None:
            raise InputError("--out DIR is required with --dataset")
        return select_probes(args)
    words = args.text.split()
    if len(words) < min_words:
        raise InputError(f"TEXT {args.text!r} needs at least {min_words} words: a prompt of {min_words - 1} or more "
                         "and a target word")
    return [Probe(id="text", prompt=" ".join(words[:-1]), target=words[-1], kind="idiom")]


def select_probes(args: argparse.Namespace) -> list:
    """The probes of `args.dataset`: the first `--limit` of each set, then a seeded `--sample` of
    each set (with `--seed`), joined in the given order (`idiom_lens.datasets.selection`)."""
    from idiom_lens.datasets.selection import select_probes as select

    check_shared_options(args)
    out = select(args.dataset, limit=getattr(args, "limit", None), sample=getattr(args, "sample", None),
                 seed=getattr(args, "seed", 0))
    if not out:
        raise InputError(f"--dataset {' '.join(map(str, args.dataset))}: no probes")
    return out


def written_folder(args: argparse.Namespace) -> Path | None:
    """The folder this command writes into, which `main` locks: `--out`, else `--results` (compare
    and report write there, when it exists); None when it writes nothing (e.g. `trace TEXT` without
    `--out`)."""
    out, results = getattr(args, "out", None), getattr(args, "results", None)
    if out is not None:
        return out
    return results if results is not None and results.is_dir() else None


def add_command(sub: argparse._SubParsersAction, name: str, *, old_name: str | None = None, help: str,
                **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser; `old_name` stays as a deprecated alias (one release) that warns on stderr."""
    if old_name is not None:
        kwargs["description"] = (kwargs.get("description") or help[:1].upper() + help[1:] + ".") + (
            f" `idiom-lens {old_name}` is the old name of this command: it still works for one release, "
            f"with a note on stderr; use `idiom-lens {name}`.")
        help = f"{help} [old name: {old_name}, deprecated]"
    parser = sub.add_parser(name, aliases=[old_name] if old_name else [], help=help, **kwargs)
    parser.set_defaults(command_name=name)
    return parser


def warn_if_old_name(args: argparse.Namespace) -> None:
    """One line on stderr when a command was called by its deprecated old name."""
    name = getattr(args, "command_name", None)
    if name is not None and args.command != name:
        print(f"idiom-lens: `{args.command}` is deprecated and will be removed in the next release; "
              f"use `idiom-lens {name}`", file=sys.stderr)


def load_from_args(args: argparse.Namespace, *, mode: str = "raw") -> Any:
    """The model of `--model/--device/--n-devices`, in numerics `mode` (fixed by the command)."""
    from idiom_lens.models.loading import load_model

    return load_model(args.model, mode=mode, device=args.device, n_devices=args.n_devices)

"""Load, validate and export probe files.

`load_probes(spec)` takes a bundled set name ("idioms", "text", "facts", "implanted") or a path and
returns a `ProbeSet`. Accepted files (UTF-8; the format is picked from the extension and, for JSON Lines,
from the first record):
- the authors' IdioMem JSONL, as published: `{"idiom": ..., "id": ..., "source": ..., flags}` per
  line (recognised by its `idiom` field); prompt = all words but the last, target = the last word;
- our JSONL (`.jsonl`, `.ndjson`, `.json` with one object per line) and CSV (`.csv`, header row):
  a `text` column, or `prompt` + `target` columns; optional `id`, `kind`, `source` and flags.
  Other keys are ignored (the implanted idioms' `template`, `base_rank`, `base_rank_model`).

Every row is validated and a bad row raises `InputError` naming the file and line; with
`on_error="skip"` bad rows are left out instead, listed in `ProbeSet.skipped` and summarised in a
warning. Flags may be JSON booleans, 0/1, or "true"/"false"/"0"/"1" strings (any case); empty or
null means unknown (None).

Ids must be unique, except in the IdioMem format: the published file repeats an id when two
idioms share a prompt ("dead as a doornail" / "dead as a dodo"), so a repeated id there is
renamed `{id}-2`, `{id}-3`, ... in file order (skipping ids the file already uses) and the
renames are reported in one warning. In our formats a repeated id is an error (a mistake).

`single_target` is computed for every loaded set: False for probes whose prompt (casefolded,
spaces collapsed) is shared with a probe of a different target, else True; a file's own
`single_target: false` is kept (it may know about probes it no longer holds). Probes that are
not single-target get `hard_to_guess = False`, even where the file says True (method.md 1).
"""

from __future__ import annotations

import csv
import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import asdict, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from idiom_lens.datasets.probes import FLAG_NAMES, PROBE_KINDS, Probe, ProbeKind, ProbeSet
from idiom_lens.errors import InputError
from idiom_lens.io import write_text

OnError = Literal["raise", "skip"]
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
CSV_SUFFIXES = (".csv",)
_TARGET_TRAILING = ".,;:!?\"')]"
_TARGET_LEADING = "\"(["
_PROBE_COLUMNS = tuple(f.name for f in fields(Probe))


class _RowError(Exception):
    """A problem with one row; the loader adds file and line."""


# ----------------------------------------------------------------------------- bundled sets


def bundled_dir() -> Path:
    """The package folder holding the bundled `{name}.jsonl` files."""
    return Path(str(resources.files("idiom_lens.datasets") / "data"))


def bundled_names() -> list[str]:
    """Names of the probe sets shipped inside the package, sorted."""
    return sorted(p.stem for p in bundled_dir().glob("*.jsonl"))


def bundled_path(name: str) -> Path:
    """Path of the bundled file `name` ("idioms", "text", "facts", "implanted")."""
    path = bundled_dir() / f"{name}.jsonl"
    if not path.is_file():
        known = ", ".join(bundled_names()) or "none"
        raise InputError(f"unknown bundled probe set {name!r}: known sets are {known} (or pass a file path)")
    return path


# ----------------------------------------------------------------------------- values


def parse_flag(value: Any) -> bool | None:
    """A flag from JSON or CSV: bool, 0/1, "true"/"false"/"0"/"1"; None or "" is unknown."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, float) and value in (0.0, 1.0):
        return bool(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "none", "null", "nan"):
            return None
        if text in ("true", "1", "1.0"):
            return True
        if text in ("false", "0", "0.0"):
            return False
    raise _RowError(f"expected a boolean flag (true/false, 0/1), got {value!r}")


def _text_field(row: dict[str, Any], name: str, *, required: bool) -> str | None:
    value = row.get(name)
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise _RowError(f"missing field {name!r}")
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise _RowError(f"field {name!r} must be a string, got {type(value).__name__}")
    return " ".join(str(value).split())


def _split_text(text: str) -> tuple[str, str]:
    words = text.split()
    if len(words) < 2:
        raise _RowError(f"text {text!r} has one word: a probe needs a prompt and a target")
    return " ".join(words[:-1]), words[-1]


def _clean_target(target: str) -> str:
    """The target word without trailing punctuation ("moon." -> "moon"); must stay non-empty."""
    if not target.strip():
        raise _RowError("empty target")
    if len(target.split()) != 1:
        raise _RowError(f"target {target!r} must be a single word")
    cleaned = target.rstrip(_TARGET_TRAILING).lstrip(_TARGET_LEADING)
    if not cleaned:
        raise _RowError(f"empty target (only punctuation: {target!r})")
    return cleaned


def _row_to_probe(row: dict[str, Any], *, default_id: str, kind: ProbeKind | None, idiomem: bool) -> Probe:
    """One validated `Probe` from a parsed row (a dict of column -> value)."""
    if idiomem:
        prompt, target = _split_text(_text_field(row, "idiom", required=True) or "")
        id_ = _text_field(row, "id", required=True) or ""
        row_kind = "idiom"
    else:
        text = _text_field(row, "text", required=False)
        if "prompt" in row or "target" in row:
            prompt = _text_field(row, "prompt", required=True) or ""
            if "target" not in row:
                raise _RowError("missing field 'target'")
            target = _text_field(row, "target", required=False) or ""
            if text is not None and text != f"{prompt} {target}":
                raise _RowError(f"text {text!r} disagrees with prompt + target {prompt + ' ' + target!r}")
        elif text is not None:
            prompt, target = _split_text(text)
        else:
            raise _RowError("missing field: need 'text', or 'prompt' and 'target'")
        id_ = _text_field(row, "id", required=False) or default_id
        row_kind = _text_field(row, "kind", required=False) or kind or "text"
    if row_kind not in PROBE_KINDS:
        raise _RowError(f"kind must be one of {', '.join(PROBE_KINDS)}, got {row_kind!r}")
    if kind is not None and row_kind != kind:
        raise _RowError(f"kind {row_kind!r} differs from the requested kind {kind!r}")
    return Probe(
        id=id_,
        prompt=prompt,
        target=_clean_target(target),
        kind=row_kind,  # type: ignore[arg-type]
        source=_text_field(row, "source", required=False) or "",
        **{name: parse_flag(row.get(name)) for name in FLAG_NAMES},
        single_target=parse_flag(row.get("single_target")),
    )


# ----------------------------------------------------------------------------- files


def _decode(path: Path) -> str:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, expected a probe file (.jsonl or .csv)") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise InputError(f"{path}:{line}: not valid UTF-8 (byte {data[err.start]:#04x}); "
                         "save the file as UTF-8") from None


def _jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any] | _RowError]]:
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, _RowError(f"malformed JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(row, dict):
            yield number, _RowError(f"expected a JSON object, got {type(row).__name__}")
            continue
        yield number, row


def _csv_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any] | _RowError]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    for record in reader:
        line = reader.line_num
        if header is None:
            header = [h.strip() for h in record]
            if not any(header):
                raise InputError(f"{path}:{line}: expected a header row (text, or prompt,target)")
            continue
        if not any(cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            yield line, _RowError(f"expected {len(header)} columns ({', '.join(header)}), got {len(record)}")
            continue
        yield line, {h: (v if v.strip() else None) for h, v in zip(header, record) if h}
    if header is None:
        raise InputError(f"{path}:1: empty file, expected a header row (text, or prompt,target)")


def _read(path: Path, *, name: str, kind: ProbeKind | None, on_error: OnError) -> ProbeSet:
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + CSV_SUFFIXES:
        raise InputError(
            f"{path}: unknown file type {suffix or '(none)'!r}; expected .jsonl (our format or IdioMem) or .csv"
        )
    text = _decode(path)
    rows = _csv_rows(path, text) if suffix in CSV_SUFFIXES else _jsonl_rows(path, text)
    loaded: list[tuple[int, Probe]] = []
    skipped: list[str] = []
    first_line: dict[str, int] = {}
    idiomem: bool | None = None
    for line, row in rows:
        try:
            if isinstance(row, _RowError):
                raise row
            if idiomem is None:
                idiomem = suffix in JSONL_SUFFIXES and "idiom" in row
            probe = _row_to_probe(row, default_id=f"{path.stem}-{line}", kind=kind, idiomem=idiomem)
            if probe.id in first_line and not idiomem:
                raise _RowError(f"duplicate id {probe.id!r} (first seen on line {first_line[probe.id]})")
        except _RowError as err:
            message = f"{path}:{line}: {err}"
            if on_error == "raise":
                raise InputError(message) from None
            skipped.append(message)
            continue
        first_line.setdefault(probe.id, line)
        loaded.append((line, probe))
    probes, renamed = _rename_repeated_ids(loaded)
    if renamed:
        shown = ", ".join(renamed[:3]) + (", ..." if len(renamed) > 3 else "")
        warnings.warn(
            f"{path}: renamed {len(renamed)} repeated id(s) to keep ids unique "
            f"(IdioMem repeats an id when idioms share a prompt): {shown}",
            stacklevel=3,
        )
    if skipped:
        shown = "\n  ".join(skipped[:10]) + ("\n  ..." if len(skipped) > 10 else "")
        warnings.warn(f"{path}: skipped {len(skipped)} bad row(s), kept {len(probes)}:\n  {shown}", stacklevel=3)
    if not probes and not skipped:
        raise InputError(f"{path}: no probes in the file")
    return ProbeSet(name, tuple(mark_single_target(probes)), tuple(skipped))


def _rename_repeated_ids(loaded: list[tuple[int, Probe]]) -> tuple[list[Probe], list[str]]:
    """Probes with unique ids: a repeated id becomes `{id}-2`, `{id}-3`, ... in file order.

    A new id never takes an id used anywhere in the file, so the result does not depend on where
    a colliding id appears. Returns the probes and one "line N 'old' -> 'new'" per rename. Only
    IdioMem rows can repeat here: our formats reject a repeated id while reading.
    """
    taken = {probe.id for _, probe in loaded}
    seen: set[str] = set()
    probes: list[Probe] = []
    renamed: list[str] = []
    for line, probe in loaded:
        if probe.id in seen:
            suffix = 2
            while f"{probe.id}-{suffix}" in taken:
                suffix += 1
            new_id = f"{probe.id}-{suffix}"
            taken.add(new_id)
            renamed.append(f"line {line} {probe.id!r} -> {new_id!r}")
            probe = replace(probe, id=new_id)
        seen.add(probe.id)
        probes.append(probe)
    return probes, renamed


def _same_text_key(text: str) -> str:
    """What two prompts (or targets) are compared on: casefolded, whitespace collapsed."""
    return " ".join(text.casefold().split())


def mark_single_target(probes: list[Probe] | tuple[Probe, ...]) -> list[Probe]:
    """`probes` with `single_target` set from the set itself (method.md criterion 1).

    A probe is single-target when every probe with its prompt (compared casefolded, spaces
    collapsed) has the same target (compared the same way). A `single_target` already False (from
    the file) stays False. Probes that are not single-target get `hard_to_guess = False`.
    """
    targets: dict[str, set[str]] = {}
    for probe in probes:
        targets.setdefault(_same_text_key(probe.prompt), set()).add(_same_text_key(probe.target))
    marked = []
    for probe in probes:
        single = len(targets[_same_text_key(probe.prompt)]) == 1 and probe.single_target is not False
        hard = probe.hard_to_guess if single else False
        marked.append(replace(probe, single_target=single, hard_to_guess=hard))
    return marked


def load_probes(spec: str | Path, *, kind: ProbeKind | None = None, on_error: OnError = "raise") -> ProbeSet:
    """Load a bundled set by name or a probe file by path (see the module docstring).

    `kind` is the default for rows without a `kind` column (else "text"); a row whose kind differs
    is an error. IdioMem rows are always idioms. `on_error="skip"` leaves bad rows out (listed in
    `ProbeSet.skipped`, with a warning) instead of raising `InputError` on the first one.

    Raises `InputError` for an unknown name, an unreadable file or a bad row (unless
    `on_error='skip'`), or a bad `kind`/`on_error`.
    """
    if on_error not in ("raise", "skip"):
        raise InputError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if kind is not None and kind not in PROBE_KINDS:
        raise InputError(f"kind must be one of {', '.join(PROBE_KINDS)}, got {kind!r}")
    spec_text = str(spec)
    path = Path(spec_text)
    looks_like_path = isinstance(spec, Path) or path.suffix or "/" in spec_text or "\\" in spec_text
    if not looks_like_path:
        if spec_text in bundled_names():
            return _read(bundled_path(spec_text), name=spec_text, kind=kind, on_error=on_error)
        if not path.exists():
            bundled_path(spec_text)  # raises: unknown name, lists the known ones
    return _read(path, name=path.stem, kind=kind, on_error=on_error)


# ----------------------------------------------------------------------------- flags join


def attach_flags(probes: ProbeSet, flags_frame: pd.DataFrame, *, source: str = "flags table") -> ProbeSet:
    """Set the flags of `probes` from a table with an `id` column, joined on id (never by row).

    Flag columns absent from the table keep their values. Every probe needs a row and every row
    a probe: unknown or missing ids, duplicate ids and non-boolean values raise `InputError`
    (rows are named by their 1-based position in the table, header excluded). A probe whose
    `single_target` is False keeps `hard_to_guess = False`, whatever the table says.
    """
    if "id" not in flags_frame.columns:
        raise InputError(f"{source}: missing column 'id' (columns: {', '.join(map(str, flags_frame.columns))})")
    columns = [c for c in FLAG_NAMES if c in flags_frame.columns]
    if not columns:
        raise InputError(f"{source}: no flag column; expected some of {', '.join(FLAG_NAMES)}")
    by_id: dict[str, dict[str, bool | None]] = {}
    for row_number, record in enumerate(flags_frame.to_dict("records"), start=1):
        id_ = str(record["id"])
        if id_ in by_id:
            raise InputError(f"{source}: row {row_number}: duplicate id {id_!r}")
        try:
            by_id[id_] = {c: parse_flag(None if pd.isna(record[c]) else record[c]) for c in columns}
        except _RowError as err:
            raise InputError(f"{source}: row {row_number} (id {id_!r}): {err}") from None
    known = {p.id for p in probes}
    unknown = sorted(set(by_id) - known)
    missing = [p.id for p in probes if p.id not in by_id]
    if unknown:
        raise InputError(f"{source}: {len(unknown)} id(s) not in probe set {probes.name!r}: {', '.join(unknown[:5])}")
    if missing:
        raise InputError(f"{source}: no flags for {len(missing)} probe(s) of {probes.name!r}: {', '.join(missing[:5])}")
    joined = []
    for probe in probes:
        probe = replace(probe, **by_id[probe.id])  # type: ignore[arg-type]
        if probe.single_target is False:
            probe = replace(probe, hard_to_guess=False)
        joined.append(probe)
    return replace(probes, probes=tuple(joined))


# ----------------------------------------------------------------------------- export


def probe_record(probe: Probe) -> dict[str, Any]:
    """The probe as one record of our JSONL format (stable key order)."""
    record = asdict(probe)
    return {name: record[name] for name in _PROBE_COLUMNS}


def export_probes(probes: ProbeSet, path: str | Path) -> Path:
    """Write `probes` to `.jsonl` or `.csv` (atomically); `load_probes(path)` reads it back."""
    path = Path(path)
    suffix = path.suffix.lower()
    records = [probe_record(p) for p in probes]
    if suffix in (".jsonl", ".ndjson"):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    elif suffix == ".csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(_PROBE_COLUMNS), lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow({k: "" if v is None else v for k, v in record.items()})
        text = buffer.getvalue()
    else:
        raise InputError(f"{path}: cannot export to {suffix or '(no extension)'!r}; use .jsonl or .csv")
    return write_text(path, text)

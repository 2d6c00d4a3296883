"""Atomic result files and verified completion markers: a long run writes each result as it
completes, and a crash never leaves a half-written file that a resumed run would trust.

A job (a trajectory part, a study stage) is finished when its folder holds a marker written
last, which records the job's settings (and their digest) and the size and sha256 of every
file the job wrote:

    {"format": 1, "key": "<sha256 of the settings>", "settings": {...},
     "files": {"summary.json": {"size": 802, "sha256": "..."}, ...}}

`check_marker` accepts a folder only when the marker parses, its key matches and every listed
file is there with the recorded size and digest; otherwise it says why, and the job is redone.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

MARKER_FORMAT = 1


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp_path)` then rename the temporary file onto `path` (same directory)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8", newline="\n"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_parquet(path: str | Path, frame: pd.DataFrame) -> Path:
    return atomic_write(path, lambda p: frame.to_parquet(p, index=False))


# --------------------------------------------------------------------------------------
# Completion markers
# --------------------------------------------------------------------------------------


def _canonical(obj: Any) -> Any:
    """`obj` as JSON reads it back (tuples become lists, other objects strings)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def key_digest(key: Any) -> str:
    """sha256 of the canonical JSON of `key` (sorted keys; tuples and lists alike)."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, as a marker lists it."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def output_files(folder: Path) -> list[Path]:
    """The files under `folder` a marker covers: all but hidden ones (markers, temporary files)."""
    folder = Path(folder)
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def write_marker(marker: str | Path, key: Any) -> Path:
    """Mark the folder of `marker` finished with settings `key`; list its files (written last)."""
    marker = Path(marker)
    folder = marker.parent
    files = {p.relative_to(folder).as_posix(): file_record(p) for p in output_files(folder)}
    return write_json(marker, {"format": MARKER_FORMAT, "key": key_digest(key),
                               "settings": _canonical(key), "files": files})


def _changed(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted names of the entries that differ between two settings (nested dicts)."""
    if isinstance(old, dict) and isinstance(new, dict):
        names: list[str] = []
        for name in sorted(set(old) | set(new), key=str):
            names += _changed(old.get(name), new.get(name), f"{prefix}{name}.")
        return names
    return [] if old == new else [prefix.rstrip(".") or "settings"]


def check_marker(marker: str | Path, key: Any) -> str | None:
    """None when `marker` records a finished job with settings `key` whose files are intact,
    else the reason not to trust the folder (one line, naming the file at fault)."""
    marker = Path(marker)
    if not marker.is_file():
        return f"no completion marker {marker.name}"
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise TypeError("not an object")
        if data.get("format") != MARKER_FORMAT:
            return f"completion marker {marker} has format {data.get('format')!r}, expected {MARKER_FORMAT}"
        records = [(str(name), int(rec["size"]), str(rec["sha256"])) for name, rec in data["files"].items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"unreadable completion marker {marker} ({type(err).__name__})"
    if data.get("key") != key_digest(key):
        changed = _changed(data.get("settings"), _canonical(key))
        return f"settings changed ({', '.join(changed) or 'key'})"
    for name, size, sha256 in records:
        path = marker.parent / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the marker recorded {size}"
        if file_record(path)["sha256"] != sha256:
            return f"{path} differs from what was written (sha256)"
    return None

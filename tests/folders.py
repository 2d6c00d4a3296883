"""Comparing two results folders: the visible files (hidden parts and markers left out) and JSON
less its timings. Shared by the fault tests and the distributed tests (tests/ is on the path:
tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TIMING_KEYS = frozenset({"seconds", "total_seconds"})


def result_files(folder: Path) -> list[str]:
    """Every file under `folder` but those in or named with a leading dot, as sorted relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def comparable(obj: Any) -> Any:
    """`obj` less its timings, and with the paths of a `files` list reduced to file names."""
    if isinstance(obj, dict):
        return {k: sorted(Path(f).name for f in v) if k == "files" else comparable(v)
                for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [comparable(v) for v in obj]
    return obj

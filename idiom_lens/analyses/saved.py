"""One way to save and load every result: parquet tables plus a descriptor, read back exactly.

A result type mixes in `Saved` and says which tables hold its data (`saved_tables`), which
tables are only written for readers (`derived_tables`: summaries, tidy views; never read back),
any small facts besides its settings (`saved_meta`), and how to rebuild itself
(`from_saved`). Then

    paths = result.save(folder)                  # or save(folder, name="knockouts_last")
    again = KnockoutResult.load(folder)          # same name: several results share a folder

`save` writes `<name>.parquet` / `<name>_<table>.parquet` (atomically, `idiom_lens.io`) and,
last, the descriptor `<name>.result.json`:

    {"type": "KnockoutResult", "format_version": 1, "name": "knockouts",
     "settings": {...}, "meta": {...},
     "tables": {"": "knockouts.parquet", "probes": "knockouts_probes.parquet"},
     "derived_tables": {"summary": "knockouts_summary.parquet"}}

Written last, the descriptor vouches that every table it lists is complete. Settings and meta
are stored so that `load` gives back values equal to those `save` was given: tuples are tagged
(JSON has only lists), and anything JSON cannot hold exactly (non-string keys, arbitrary
objects) is refused at save time rather than silently turned into a string.

`load` raises `InputError` (naming the folder and what was expected) for a missing folder or
descriptor, another result type, another format version, or a listed table that is missing.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

import numpy as np
import pandas as pd
from jaxtyping import Shaped

from idiom_lens.errors import InputError
from idiom_lens.io import write_json, write_parquet

DESCRIPTOR_SUFFIX = ".result.json"
_TUPLE = "__tuple__"  # tag of a tuple in the descriptor's JSON
T = TypeVar("T")


# --------------------------------------------------------------------------------------
# File names
# --------------------------------------------------------------------------------------


def check_name(name: str) -> str:
    """`name` if it can prefix file names in one folder (not empty, no separator, not hidden:
    completion markers skip hidden files), else `InputError`."""
    if not name or "/" in name or "\\" in name or name.startswith(".") or name != name.strip():
        raise InputError(f"result name {name!r} cannot name files: expected a plain name like 'knockouts'")
    return name


def table_file(name: str, table: str) -> str:
    """`<name>.parquet` for the main table (key ""), else `<name>_<table>.parquet`."""
    return f"{name}.parquet" if table == "" else f"{name}_{table}.parquet"


def descriptor_path(folder: str | Path, name: str) -> Path:
    """Where the result saved as `name` in `folder` keeps its descriptor."""
    return Path(folder) / f"{check_name(name)}{DESCRIPTOR_SUFFIX}"


def write_tables(folder: str | Path, name: str, tables: Mapping[str, pd.DataFrame]) -> list[Path]:
    """Write each table as `table_file(name, key)` in `folder` (atomic, in the given order)."""
    folder = Path(folder)
    return [write_parquet(folder / table_file(name, key), frame) for key, frame in tables.items()]


# --------------------------------------------------------------------------------------
# Exact JSON for settings and meta
# --------------------------------------------------------------------------------------


def encode_exact(value: Any, where: str = "settings") -> Any:
    """`value` as JSON that `decode_exact` turns back into an equal value.

    Plain scalars, lists and str-keyed dicts pass through; tuples become {"__tuple__": [...]};
    numpy scalars become Python scalars. Anything else raises `TypeError` naming `where`: a
    result whose settings cannot be read back equal must not be saved as if they could.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):
        return encode_exact(value.item(), where)
    if isinstance(value, tuple):
        return {_TUPLE: [encode_exact(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_exact(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        for key in value:
            if not isinstance(key, str):
                raise TypeError(f"{where} has the key {key!r}: only string keys survive JSON unchanged")
        if _TUPLE in value:
            raise TypeError(f"{where} uses the reserved key {_TUPLE!r}")
        return {key: encode_exact(v, f"{where}.{key}") for key, v in value.items()}
    raise TypeError(
        f"{where} is a {type(value).__name__}, which cannot be saved exactly: use None, bool, int, float, "
        "str, lists, tuples and dicts with string keys"
    )


def decode_exact(value: Any) -> Any:
    """Inverse of `encode_exact`."""
    if isinstance(value, list):
        return [decode_exact(v) for v in value]
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(decode_exact(v) for v in value[_TUPLE])
        return {key: decode_exact(v) for key, v in value.items()}
    return value


# --------------------------------------------------------------------------------------
# Reading values back from parquet
# --------------------------------------------------------------------------------------


def plain(value: Any, *, optional: bool = False) -> Any:
    """A cell read from parquet as a plain Python value: numpy scalars unwrapped, missing values
    (None, pd.NA; NaN too when `optional`, i.e. where the field may be None) as None."""
    if value is None or value is pd.NA:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if optional and isinstance(value, float) and math.isnan(value):
        return None
    return value


def records_from_frame(
    record_type: type[T], frame: pd.DataFrame, *, extra: Sequence[Mapping[str, Any]] | None = None
) -> tuple[T, ...]:
    """Rebuild dataclass records from a table with one column per (scalar) field.

    `extra[i]` gives row i's other fields (tensors, nested records). A field absent from both
    takes its default (tables saved before it existed still load); a field whose annotation
    allows None reads NaN as None.
    """
    given = set(extra[0]) if extra else set()
    specs = [(f.name, "None" in str(f.type), f.default is not MISSING or f.default_factory is not MISSING)
             for f in fields(record_type)]  # type: ignore[arg-type]
    missing = [name for name, _, has_default in specs
               if name not in frame.columns and name not in given and not has_default]
    if missing:
        raise InputError(f"the {record_type.__name__} table lacks the columns {missing}")
    present = [(name, optional) for name, optional, _ in specs if name in frame.columns and name not in given]
    columns = {name: frame[name].tolist() for name, _ in present}
    return tuple(
        record_type(**{name: plain(columns[name][i], optional=optional) for name, optional in present},
                    **(extra[i] if extra else {}))
        for i in range(len(frame))
    )


def encode_array(array: Shaped[np.ndarray, "..."]) -> dict[str, Any]:  # noqa: UP037 (a jaxtyping shape, not a forward reference)
    """An array as three parquet cells (dtype, shape, raw bytes): exact for any numeric dtype."""
    array = np.ascontiguousarray(array)
    return {"dtype": array.dtype.str, "shape": [int(n) for n in array.shape], "data": array.tobytes()}


def decode_array(dtype: str, shape: Any, data: bytes) -> Shaped[np.ndarray, "..."]:  # noqa: UP037 (a jaxtyping shape, not a forward reference)
    """Inverse of `encode_array` (a writable copy)."""
    return np.frombuffer(data, dtype=np.dtype(dtype)).reshape([int(n) for n in shape]).copy()


def rows_from_merged(frame: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The original rows of a table saved with columns merged in (the readers' tidy view): its
    own `columns`, in order. Saving the merged view once avoids writing the rows twice."""
    lacking = [c for c in columns if c not in frame.columns]
    if lacking:
        raise InputError(f"the saved table lacks the columns {lacking}")
    return frame[columns].reset_index(drop=True)


# --------------------------------------------------------------------------------------
# The mixin
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SavedTables:
    """What `Saved.load` read back, handed to `from_saved`: the result's settings and meta (equal
    to what was saved) and its data tables keyed as `saved_tables` keyed them."""

    folder: Path
    name: str
    settings: dict[str, Any]
    meta: dict[str, Any]
    tables: dict[str, pd.DataFrame]


class Saved:
    """Mixin: `result.save(folder, name=...)` and `Type.load(folder, name=...)`.

    A result type sets `default_name` (its files' prefix), bumps `format_version` whenever its
    saved layout changes (old folders then fail to load with a clear message instead of loading
    wrong), has a `settings` dict (field or property), and implements `saved_tables`,
    `from_saved` and, where it has them, `derived_tables` and `saved_meta`.
    """

    default_name: ClassVar[str]
    format_version: ClassVar[int] = 1

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        """The tables `from_saved` rebuilds the result from ("" is the main table)."""
        raise NotImplementedError

    def derived_tables(self) -> dict[str, pd.DataFrame]:
        """Tables written for readers only (summaries); `load` does not read them."""
        return {}

    def saved_meta(self) -> dict[str, Any]:
        """Small facts besides the settings that `from_saved` needs (stored exactly, like settings)."""
        return {}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> Self:
        """Rebuild the result from what `save` wrote."""
        raise NotImplementedError

    def save(self, folder: str | Path, *, name: str | None = None) -> list[Path]:
        """Write the tables, then the descriptor `<name>.result.json` (last); return every path.

        `name` (default `default_name`) prefixes every file, so results of one type can sit side
        by side in one folder (e.g. "knockouts_all" and "knockouts_last").
        """
        folder = Path(folder)
        name = check_name(self.default_name if name is None else name)
        settings = encode_exact(self.settings, "settings")
        meta = encode_exact(self.saved_meta(), "meta")
        tables, derived = self.saved_tables(), self.derived_tables()
        paths = write_tables(folder, name, tables) + write_tables(folder, name, derived)
        descriptor = {
            "type": type(self).__name__,
            "format_version": self.format_version,
            "name": name,
            "settings": settings,
            "meta": meta,
            "tables": {key: table_file(name, key) for key in tables},
            "derived_tables": {key: table_file(name, key) for key in derived},
        }
        paths.append(write_json(descriptor_path(folder, name), descriptor))
        return paths

    @classmethod
    def join_parts(cls, parts: Sequence[Self]) -> Self:
        """Parts of one run (the same settings, disjoint probes, in order) as one result: every
        table field concatenated in the parts' order, the settings of the parts with their counts
        (`JOINED_COUNTS`) and seconds summed. `InputError` when the parts' settings differ
        otherwise: results of different runs are not parts of one."""
        if not parts:
            raise InputError(f"no {cls.__name__} parts to join")
        values = {f.name: [getattr(p, f.name) for p in parts] for f in fields(cls)}  # type: ignore[arg-type]
        joined = {name: _concat_frames(frames) for name, frames in values.items()
                  if all(isinstance(v, pd.DataFrame) for v in frames)}
        rest = set(values) - set(joined) - {"settings"}
        if rest:
            raise TypeError(f"{cls.__name__}.join_parts joins table fields and settings only, not {sorted(rest)}")
        return cls(**joined, settings=joined_settings(parts, what=cls.__name__))  # type: ignore[call-arg]

    @classmethod
    def load(cls, folder: str | Path, *, name: str | None = None) -> Self:
        """Read back a result `save` wrote to `folder` under `name` (default `default_name`)."""
        folder = Path(folder)
        name = check_name(cls.default_name if name is None else name)
        expected = cls.__name__
        path = descriptor_path(folder, name)
        if not folder.is_dir():
            raise InputError(f"cannot load a {expected} from {folder}: no such folder")
        if not path.is_file():
            raise InputError(
                f"cannot load a {expected} from {folder}: it has no {path.name} (expected a {expected} "
                f"saved there under the name {name!r})"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            raise InputError(f"{path} is not a readable result descriptor ({err}): expected a {expected}") from err
        if data.get("type") != expected:
            raise InputError(f"{path} holds a {data.get('type')}, expected a {expected}")
        if data.get("format_version") != cls.format_version:
            raise InputError(
                f"{path} holds a {expected} in format version {data.get('format_version')!r}, expected version "
                f"{cls.format_version}: save it again with this version of idiom_lens"
            )
        tables: dict[str, pd.DataFrame] = {}
        for key, file in dict(data.get("tables", {})).items():
            table = folder / str(file)
            if Path(str(file)).name != file or not table.is_file():
                raise InputError(f"{folder} lacks {file}, which {path.name} lists for its {expected}")
            tables[str(key)] = pd.read_parquet(table)
        saved = SavedTables(folder=folder, name=name, settings=decode_exact(data.get("settings", {})),
                            meta=decode_exact(data.get("meta", {})), tables=tables)
        return cls.from_saved(saved)


# --------------------------------------------------------------------------------------
# Parts of one run, joined
# --------------------------------------------------------------------------------------

JOINED_COUNTS = ("n_probes", "n_pairs", "n_skipped")  # settings that count the probes of a part


def joined_settings(parts: Sequence[Any], *, what: str) -> dict[str, Any]:
    """The settings of parts of one run: equal but for their counts (summed) and seconds (summed);
    `InputError` naming the settings that differ otherwise."""
    varying = (*JOINED_COUNTS, "seconds")
    first = {k: v for k, v in parts[0].settings.items() if k not in varying}
    for part in parts[1:]:
        other = {k: v for k, v in part.settings.items() if k not in varying}
        if other != first:
            differ = sorted(k for k in first.keys() | other.keys() if first.get(k) != other.get(k))
            raise InputError(f"{what} parts were run with different settings ({', '.join(differ)}): "
                             "they are not parts of one run")
    settings = dict(parts[0].settings)
    for name in JOINED_COUNTS:
        if name in settings:
            settings[name] = sum(int(p.settings[name]) for p in parts)
    if "seconds" in settings:
        settings["seconds"] = round(sum(float(p.settings["seconds"]) for p in parts), 2)
    return settings


def _concat_frames(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Frames in order; empty ones left out (their all-object columns would change dtypes)
    unless every one is empty."""
    kept = [f for f in frames if len(f)] or list(frames[:1])
    return pd.concat(kept, ignore_index=True)


# --------------------------------------------------------------------------------------
# Per-probe rows with a probe table (knockouts, layer skipping)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProbeRowsResult(Saved):
    """Outcomes as rows (one per probe and configuration) plus one row per probe, with settings:
    the common shape of the knockout and layer-skipping results.

    Saved as the readers' tidy view `<name>.parquet` (the rows with each probe's kind and group
    merged in; `load` takes the rows' own columns back out), `<name>_probes.parquet` and the
    type's `summary()` as `<name>_summary.parquet` (for readers; not read back).
    """

    rows: pd.DataFrame
    probes: pd.DataFrame
    settings: dict[str, Any]

    MERGED: ClassVar[tuple[str, ...]] = ("kind", "group")  # probe columns `to_dataframe` adds to each row

    def to_dataframe(self) -> pd.DataFrame:
        """The rows with their probe's kind and group (rows without a probe get missing values)."""
        return self.rows.merge(self.probes[["probe_id", *self.MERGED]], on="probe_id", how="left")

    def summary(self) -> pd.DataFrame:
        """Per set and configuration; each result type has its own."""
        raise NotImplementedError

    def in_sets(self, sets: Mapping[str, Sequence[str]]) -> Self:
        """The same result with its probes regrouped: one probe row per (set, probe id) with
        `group` = the set's name, for sets that are not the memorization groups (a matched
        sample; sets may share probes, each then counted in both). Probes in no set are dropped;
        a probe id the result lacks raises `InputError`."""
        have = set(self.probes["probe_id"])
        missing = sorted({pid for ids in sets.values() for pid in ids} - have)
        if missing:
            raise InputError(f"sets name probes this result does not have: {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}")
        indexed = self.probes.set_index("probe_id", drop=False)
        frames = [indexed.loc[list(ids)].assign(group=name) for name, ids in sets.items() if ids]
        probes = pd.concat(frames, ignore_index=True) if frames else self.probes.iloc[:0]
        kept = set(probes["probe_id"])
        rows = self.rows[self.rows["probe_id"].isin(kept)].reset_index(drop=True)
        return dataclasses.replace(self, rows=rows, probes=probes.reset_index(drop=True))

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        clash = [c for c in self.MERGED if c in self.rows.columns]
        if clash:
            raise ValueError(f"rows already have the columns {clash} that to_dataframe merges in")
        return {"": self.to_dataframe(), "probes": self.probes}

    def derived_tables(self) -> dict[str, pd.DataFrame]:
        return {"summary": self.summary()}

    def saved_meta(self) -> dict[str, Any]:
        return {"row_columns": [str(c) for c in self.rows.columns]}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> Self:
        rows = rows_from_merged(saved.tables[""], saved.meta["row_columns"])
        return cls(rows=rows, probes=saved.tables["probes"], settings=saved.settings)

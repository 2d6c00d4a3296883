"""The knockout grid: which neurons (mode, control, k) in which layer windows, and the options of a sweep."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np

from idiom_lens.errors import InputError

RankBy = Literal["effective", "magnitude", "dla"]
Positions = Literal["all", "last"]
NormHandling = Literal["frozen", "live"]
Ablation = Literal["zero", "mean"]

MODES: tuple[str, ...] = ("zero_top", "keep_top")
# every control a sweep accepts (besides "targeted"): "matched" matches the removed vector's norm,
# "matched_score" the summed scalar score (the earlier definition, kept for comparison)
CONTROLS: tuple[str, ...] = ("random", "matched", "matched_score", "whole_mlp")
DEFAULT_CONTROLS: tuple[str, ...] = ("random", "matched", "whole_mlp")  # `KnockoutOptions`' default
RANKINGS: tuple[str, ...] = ("effective", "magnitude", "dla")  # effective: ours; magnitude: the authors'
POSITIONS: tuple[str, ...] = ("all", "last")
NORMS: tuple[str, ...] = ("frozen", "live")  # frozen: the primary result; live: the secondary
ABLATIONS: tuple[str, ...] = ("zero", "mean")


@dataclass(frozen=True, kw_only=True)
class KnockoutGrid:
    """Which (mode, k, window length) a knockout sweep holds; every start layer of every window length.

    zero_top: every k in `ks` in windows of `windows` layers; keep_top: every k in `keep_top_ks`
    (None: `ks`) in windows of `keep_top_windows` (None: `windows`). Class-level grids: `DEFAULT`
    (ours), `PAPER` (the authors') and `STUDY` (what `idiom-lens run` uses). Raises `InputError`
    for an empty or negative entry or an unknown mode.
    """

    # Ours: zero_top for k in 1, 10, 100, 1000 in windows of 1-5 layers; keep_top for k = 100 in windows
    # of 1-3 (keep_top with small k in a long window ablates whole MLPs and says little).
    ks: tuple[int, ...] = (1, 10, 100, 1000)
    windows: tuple[int, ...] = (1, 2, 3, 4, 5)
    modes: tuple[str, ...] = ("zero_top", "keep_top")
    keep_top_ks: tuple[int, ...] | None = (100,)
    keep_top_windows: tuple[int, ...] | None = (1, 2, 3)

    DEFAULT: ClassVar[KnockoutGrid]
    PAPER: ClassVar[KnockoutGrid]
    STUDY: ClassVar[KnockoutGrid]

    def __post_init__(self) -> None:
        for name in ("ks", "windows", "keep_top_ks", "keep_top_windows"):
            value = getattr(self, name)
            if value is None and name.startswith("keep_top"):
                continue
            if value is None or isinstance(value, (str, int)) or not value:
                raise InputError(f"{name} must be a non-empty sequence of whole numbers, got {value!r}")
            value = tuple(int(v) for v in value)
            low = 1 if "windows" in name else 0
            if any(v < low for v in value):
                raise InputError(f"{name} must be whole numbers >= {low}, got {list(value)}")
            object.__setattr__(self, name, value)
        modes = (self.modes,) if isinstance(self.modes, str) else tuple(self.modes)
        if not modes or any(m not in MODES for m in modes):
            raise InputError(f"modes must be among {', '.join(MODES)}, got {list(modes)}")
        object.__setattr__(self, "modes", modes)

    def clipped(self, n_layers: int) -> KnockoutGrid:
        """This grid without the window lengths a model of `n_layers` layers cannot hold (for the
        class-level grids, written for deep models; `knockout_grid` clips those and no other)."""
        def clip(windows: tuple[int, ...] | None) -> tuple[int, ...] | None:
            return None if windows is None else tuple(w for w in windows if w <= n_layers)

        return dataclasses.replace(self, windows=clip(self.windows), keep_top_windows=clip(self.keep_top_windows))

    def describe(self) -> dict[str, Any]:
        """The grid as plain lists (settings)."""
        return {"ks": list(self.ks), "windows": list(self.windows), "modes": list(self.modes),
                "keep_top_ks": None if self.keep_top_ks is None else list(self.keep_top_ks),
                "keep_top_windows": None if self.keep_top_windows is None else list(self.keep_top_windows)}


KnockoutGrid.DEFAULT = KnockoutGrid()
# The paper's full grid (the authors' knockouts.py): top-k for k in 1, 10, 100, 1000 in windows of 1-5 layers,
# all-but-top-k for k in 10, 100, 1000 in windows of 1-3 layers.
KnockoutGrid.PAPER = KnockoutGrid(ks=(1, 10, 100, 1000), windows=(1, 2, 3, 4, 5), modes=MODES,
                                  keep_top_ks=(10, 100, 1000), keep_top_windows=(1, 2, 3))
# The study's (`idiom-lens run`): k = 100 in windows of one layer, zero_top only (4 x 18 configurations per
# probe on Gemma 3 270M with the three controls).
KnockoutGrid.STUDY = KnockoutGrid(ks=(100,), windows=(1,), modes=("zero_top",), keep_top_ks=None,
                                  keep_top_windows=None)


@dataclass(frozen=True, kw_only=True)
class KnockoutOptions:
    """What `knockout_grid` runs (see the package docstring for each option): the `grid`, the
    `controls` beside each targeted configuration (() for none; `CONTROLS` lists them all), the
    neuron ranking (``effective``, ours, by default; ``magnitude`` = |m| x ||v||, the authors'),
    the positions knocked out, the post-MLP norm handling (``frozen`` by default: a knockout
    removes exactly its neurons' contributions; ``live``: the norm rescales what remains), the
    ablation (``zero`` the knocked neurons' activations, or set them to their ``mean`` over the
    ordinary-text reference set) and the `seed` of the random controls. Raises `InputError` for an
    unknown value."""

    grid: KnockoutGrid = KnockoutGrid.DEFAULT
    controls: tuple[str, ...] = DEFAULT_CONTROLS
    rank_by: RankBy = "effective"
    positions: Positions = "all"
    norm: NormHandling = "frozen"
    ablation: Ablation = "zero"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.grid, KnockoutGrid):
            raise InputError(f"grid must be a KnockoutGrid, got {self.grid!r}")
        controls = (self.controls,) if isinstance(self.controls, str) else tuple(self.controls)
        bad = [c for c in controls if c not in CONTROLS]
        if bad:
            raise InputError(f"controls must be among {', '.join(CONTROLS)}, got {list(controls)}")
        object.__setattr__(self, "controls", controls)
        if self.rank_by not in RANKINGS:
            raise InputError(f"rank_by must be one of {', '.join(RANKINGS)}, got {self.rank_by!r}")
        if self.positions not in POSITIONS:
            raise InputError(f"positions must be 'all' or 'last', got {self.positions!r}")
        if self.norm not in NORMS:
            raise InputError(f"norm must be 'frozen' or 'live', got {self.norm!r}")
        if self.ablation not in ABLATIONS:
            raise InputError(f"ablation must be 'zero' or 'mean', got {self.ablation!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise InputError(f"seed must be a whole number, got {self.seed!r}")


@dataclass(frozen=True, slots=True)
class KnockoutCell:
    """One intervention: which neurons (mode, control, k) in which layers (start..end)."""

    mode: str  # zero_top | keep_top
    control: str  # targeted | random | matched | matched_score | whole_mlp
    k: int
    start: int
    end: int  # inclusive

    @property
    def layers(self) -> range:
        return range(self.start, self.end + 1)


def _check_windows(windows: Sequence[int], n_layers: int, what: str) -> None:
    if not windows or any(int(w) < 1 or int(w) > n_layers for w in windows):
        raise InputError(f"{what} window lengths must be in 1..{n_layers}, got {list(windows)}")


def knockout_cells(
    n_layers: int,
    grid: KnockoutGrid = KnockoutGrid.DEFAULT,
    *,
    controls: Sequence[str] = DEFAULT_CONTROLS,
    d_mlp: int | None = None,
) -> list[KnockoutCell]:
    """Every cell of `grid`: windows of each length at every start layer.

    Each targeted cell comes with its `controls` (random for both modes, matched and matched_score
    for zero_top only: for keep_top, a matched set drawn outside the top-k would be the complement
    that keep_top already zeroes),
    and ``whole_mlp`` adds one cell per window (k = `d_mlp`). Raises `InputError` for a window
    longer than the model or an unknown control.
    """
    ks, windows, modes = grid.ks, grid.windows, grid.modes
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise InputError(f"controls must be among {', '.join(CONTROLS)}, got {list(controls)}")
    if "whole_mlp" in controls and not d_mlp:
        raise InputError("the whole_mlp control needs d_mlp")
    keep_top_ks = ks if grid.keep_top_ks is None else grid.keep_top_ks
    keep_top_windows = windows if grid.keep_top_windows is None else grid.keep_top_windows
    _check_windows(windows, n_layers, "zero_top")
    if "keep_top" in modes:
        _check_windows(keep_top_windows, n_layers, "keep_top")
    out: list[KnockoutCell] = []
    all_windows: set[int] = set()
    for mode in modes:
        mode_ks = ks if mode == "zero_top" else keep_top_ks
        mode_windows = windows if mode == "zero_top" else keep_top_windows
        mode_controls = ["targeted"] + [c for c in controls
                                        if c == "random" or (c in ("matched", "matched_score") and mode == "zero_top")]
        all_windows |= {int(w) for w in mode_windows}
        for k in sorted(dict.fromkeys(int(k) for k in mode_ks)):
            for w in sorted(set(int(w) for w in mode_windows)):
                for start in range(n_layers - w + 1):
                    for c in mode_controls:
                        out.append(KnockoutCell(mode, c, k, start, start + w - 1))
    if "whole_mlp" in controls:
        for w in sorted(all_windows):
            for start in range(n_layers - w + 1):
                out.append(KnockoutCell("zero_top", "whole_mlp", int(d_mlp), start, start + w - 1))
    return out

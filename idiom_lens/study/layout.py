"""The layout of a results folder, owned here and nowhere else.

    OUT/study.json                  format version and the idiom_lens that wrote it
    OUT/<model>/trajectory/         memorization, logit-lens trajectory, phases (resumable parts)
    OUT/<model>/lenses/             the trajectory under the logit, tuned and Jacobian lenses, compared
    OUT/<model>/attribution/        direct logit attribution of a sample per set
    OUT/<model>/interventions/      knockouts, value vectors, layer skipping
    OUT/<model>/patching/           activation patching (exact)
    OUT/<model>/tracing/            causal tracing (ROME) of memorized and non-memorized idioms
    OUT/<model>/attention_knockout/ attention knockout (Geva et al. 2023) of a sample per set
    OUT/<model>/recall/             where recall lives: every method per layer in one figure
    OUT/comparison/                 models compared on normalized depth
    OUT/report.html                 the report

Every stage folder holds a `summary.json`, its tables and figures (`*.fig.json`, `.html`, `.png`)
and a completion marker. The study's stages write through `ModelFolder` paths, and the report,
the comparison and the notebook read through `StudyFolder.open` and the loaders below, never by
file name. A folder written before this layout existed (no `study.json`) is refused with the
command that regenerates it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from idiom_lens.errors import InputError

if TYPE_CHECKING:  # the loaders import lazily: opening a folder stays cheap
    from idiom_lens.analyses.attribution import AttributionResult
    from idiom_lens.analyses.interventions import KnockoutResult, PatchingResult, SkipResult
    from idiom_lens.analyses.interventions.attention_knockout import AttentionKnockoutResult
    from idiom_lens.analyses.interventions.tracing import TracingResult
    from idiom_lens.analyses.lens_comparison import LensComparison
    from idiom_lens.analyses.memorization import MemorizationResult
    from idiom_lens.analyses.phases import PhaseAnalysis
    from idiom_lens.analyses.recall import RecallProfile
    from idiom_lens.analyses.trajectory import TrajectoryResult

FORMAT = 4  # bump when a stage's files change meaning; stage keys include it, so stages are redone
STUDY_FILE = "study.json"
REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
FIGURE_SUFFIX = ".fig.json"

TRAJECTORY = "trajectory"
LENSES = "lenses"
ATTRIBUTION = "attribution"
INTERVENTIONS = "interventions"
PATCHING = "patching"
TRACING = "tracing"
ATTENTION_KNOCKOUT = "attention_knockout"
RECALL = "recall"
GROUND_TRUTH = "ground_truth"
COMPARISON = "comparison"
STAGES = (TRAJECTORY, LENSES, RECALL, ATTRIBUTION, INTERVENTIONS, TRACING, ATTENTION_KNOCKOUT, PATCHING,
          GROUND_TRUTH)  # report order

def _regenerate(root: Path) -> str:
    return (f"regenerate it: remove it or choose another folder, then `idiom-lens run --out {root}` "
            "(or `run_study` from Python)")


def folder_name(model_name: str) -> str:
    """The folder of a model's results: its name with path separators replaced."""
    return model_name.replace("/", "_")


@dataclass(frozen=True)
class Stage:
    """One stage folder as written: its summary (empty if none) and its figures, in name order."""

    name: str
    path: Path
    summary: dict[str, Any]
    figures: tuple[Path, ...]

    def table(self, name: str) -> pd.DataFrame:
        """A table the stage wrote beside its summary, by file stem, e.g. `stage.table("knockout_layers")`
        (results and derived analyses load through `ModelFolder`'s typed loaders instead)."""
        path = self.path / f"{name}.parquet"
        if not path.is_file():
            raise InputError(f"{self.name} stage in {str(self.path)!r} has no table {name!r}")
        return pd.read_parquet(path)

    def has_table(self, name: str) -> bool:
        return (self.path / f"{name}.parquet").is_file()

    def results(self, result_type: type) -> dict[str, Any]:
        """Every result of `result_type` (e.g. `KnockoutResult`) the stage saved, by saved name,
        loaded with its settings (`analyses.saved`)."""
        from idiom_lens.analyses.saved import DESCRIPTOR_SUFFIX

        found = {}
        for path in sorted(self.path.glob(f"*{DESCRIPTOR_SUFFIX}")):
            if _read_json(path).get("type") == result_type.__name__:
                name = path.name[: -len(DESCRIPTOR_SUFFIX)]
                found[name] = result_type.load(self.path, name=name)
        return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {str(path)!r}: {err}") from err
    return data if isinstance(data, dict) else {"value": data}


def natural_key(text: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def figure_stem(path: Path) -> str:
    """`layers_logit.fig.json` -> `layers_logit`."""
    return path.name[: -len(FIGURE_SUFFIX)]


def read_stage(path: Path) -> Stage:
    """The summary and figures of a stage folder (figures in subfolders included, parts excluded)."""
    summary = _read_json(path / SUMMARY_FILE) if (path / SUMMARY_FILE).is_file() else {}
    figures = [p for p in path.rglob(f"*{FIGURE_SUFFIX}")
               if not any(part.startswith(".") for part in p.relative_to(path).parts[:-1])]
    figures.sort(key=lambda p: natural_key(str(p.relative_to(path))))
    return Stage(name=path.name, path=path, summary=summary, figures=tuple(figures))


@dataclass(frozen=True)
class ModelFolder:
    """The results of one model: a folder per stage."""

    name: str
    path: Path

    def stage_path(self, stage: str) -> Path:
        return self.path / stage

    def has(self, stage: str) -> bool:
        """True when the stage wrote its summary (it finished at least once)."""
        return (self.stage_path(stage) / SUMMARY_FILE).is_file()

    def stage(self, stage: str) -> Stage | None:
        return read_stage(self.stage_path(stage)) if self.has(stage) else None

    def stages(self) -> list[Stage]:
        """The finished stages, known ones in run order, then any other stage folder by name."""
        others = sorted(p.name for p in self.path.iterdir()
                        if p.is_dir() and p.name not in STAGES and not p.name.startswith(".")
                        and (p / SUMMARY_FILE).is_file())
        return [s for s in (self.stage(n) for n in (*STAGES, *others)) if s is not None]

    def _need(self, stage: str) -> Path:
        if not self.has(stage):
            raise InputError(f"model {self.name!r} in {str(self.path.parent)!r} has no finished {stage} stage; "
                             f"{_regenerate(self.path.parent)}")
        return self.stage_path(stage)

    def trajectory(self) -> TrajectoryResult:
        """The `TrajectoryResult` (memorization included) with its settings."""
        from idiom_lens.analyses.trajectory import load_trajectory

        path = self._need(TRAJECTORY)
        return load_trajectory(path, settings=_read_json(path / SUMMARY_FILE).get("settings"))

    def lens_trajectory(self, lens: str) -> TrajectoryResult:
        """The `TrajectoryResult` read through `lens` (logit, tuned, jacobian) in the lenses stage."""
        from idiom_lens.analyses.trajectory import TrajectoryResult

        path = self._need(LENSES) / lens
        if not (path / SUMMARY_FILE).is_file():
            raise InputError(f"model {self.name!r} has no {lens} lens trajectory in {str(path.parent)!r}; run "
                             f"`idiom-lens run --lens {lens}`")
        return TrajectoryResult.load(path)

    def phases(self) -> PhaseAnalysis:
        """The `PhaseAnalysis` of the trajectory stage."""
        from idiom_lens.analyses.phases import PhaseAnalysis

        return PhaseAnalysis.load(self._need(TRAJECTORY))

    def lens_comparison(self) -> LensComparison:
        """The `LensComparison` of the lenses stage (each lens's phases: `lens_phases`)."""
        from idiom_lens.analyses.lens_comparison import LensComparison

        return LensComparison.load(self._need(LENSES))

    def lens_phases(self, lens: str) -> PhaseAnalysis:
        """The `PhaseAnalysis` of the trajectory read through `lens` in the lenses stage."""
        from idiom_lens.analyses.phases import PhaseAnalysis

        return PhaseAnalysis.load(self._need(LENSES) / lens)

    def recall(self) -> RecallProfile:
        """The `RecallProfile` the recall stage saved (`recall_profile()` computes it afresh)."""
        from idiom_lens.analyses.recall import RecallProfile

        return RecallProfile.load(self._need(RECALL))

    def memorization(self) -> MemorizationResult:
        """The `MemorizationResult` of every probe of the study."""
        return self.trajectory().memorization

    def n_layers(self) -> int:
        return int(_read_json(self._need(TRAJECTORY) / SUMMARY_FILE)["settings"]["n_layers"])

    def knockouts(self, *, positions: str | None = None) -> KnockoutResult:
        """The `KnockoutResult` of the interventions stage (`positions`: the extra variant, if run)."""
        from idiom_lens.analyses.interventions import KnockoutResult

        path = self._need(INTERVENTIONS)
        stem = "knockouts" if positions is None else f"knockouts_{positions}"
        return KnockoutResult.load(path, name=stem)

    def skipping(self) -> SkipResult:
        """The `SkipResult` of the interventions stage."""
        from idiom_lens.analyses.interventions import SkipResult

        return SkipResult.load(self._need(INTERVENTIONS))

    def patching(self) -> PatchingResult:
        """The `PatchingResult` of the patching stage."""
        from idiom_lens.analyses.interventions import PatchingResult

        return PatchingResult.load(self._need(PATCHING))

    def tracing(self) -> TracingResult:
        """The `TracingResult` of the causal-tracing stage."""
        from idiom_lens.analyses.interventions.tracing import TracingResult

        return TracingResult.load(self._need(TRACING))

    def attention_knockout(self) -> AttentionKnockoutResult:
        """The `AttentionKnockoutResult` of the attention-knockout stage."""
        from idiom_lens.analyses.interventions.attention_knockouts import AttentionKnockoutResult

        return AttentionKnockoutResult.load(self._need(ATTENTION_KNOCKOUT))

    def attribution(self) -> AttributionResult:
        """The `AttributionResult` of the attribution stage (compatibility mode)."""
        from idiom_lens.analyses.attribution import AttributionResult

        return AttributionResult.load(self._need(ATTRIBUTION))

    def recall_profile(self) -> RecallProfile:
        """`analyses.recall.recall_profile` over the finished stages among interventions,
        tracing, attention knockout and attribution (`InputError` when none is finished)."""
        from idiom_lens.analyses.recall import recall_profile

        loaders = {"knockouts": (INTERVENTIONS, self.knockouts), "tracing": (TRACING, self.tracing),
                   "attention": (ATTENTION_KNOCKOUT, self.attention_knockout),
                   "attribution": (ATTRIBUTION, self.attribution)}
        given = {name: load() for name, (stage, load) in loaders.items() if self.has(stage)}
        return recall_profile(**given)


@dataclass(frozen=True)
class StudyFolder:
    """A results folder: one `ModelFolder` per model, the comparison and the report."""

    root: Path

    @classmethod
    def create(cls, root: str | Path) -> StudyFolder:
        """Open `root` for writing: a new folder gets `study.json`; an existing one must hold this
        format (an older one is refused rather than mixed with new results)."""
        from idiom_lens import __version__
        from idiom_lens.io import write_json

        root = Path(root)
        if (root / STUDY_FILE).is_file():
            return cls.open(root)
        if root.is_dir() and any(p.is_dir() and (p / TRAJECTORY).is_dir() for p in root.iterdir()):
            raise InputError(f"{str(root)!r} holds results of an earlier idiom_lens (no {STUDY_FILE}): "
                             f"{_regenerate(root)}")
        write_json(root / STUDY_FILE, {"format": FORMAT, "written_by": f"idiom_lens {__version__}"})
        return cls(root)

    @classmethod
    def open(cls, root: str | Path) -> StudyFolder:
        """Open an existing results folder for reading. Raises `InputError` when it does not exist,
        was written by an older idiom_lens, or by a newer one."""
        root = Path(root)
        if not root.is_dir():
            raise InputError(f"results folder {str(root)!r} does not exist")
        meta = root / STUDY_FILE
        if not meta.is_file():
            raise InputError(f"{str(root)!r} is not a results folder of this idiom_lens (no {STUDY_FILE}): if an "
                             f"earlier version wrote it, {_regenerate(root)}")
        found = _read_json(meta).get("format")
        if found != FORMAT:
            raise InputError(f"{str(root)!r} holds results in format {found}, this idiom_lens reads format {FORMAT}: "
                             f"{_regenerate(root)}")
        return cls(root)

    def model(self, name: str) -> ModelFolder:
        """The folder of one model (named as the model, e.g. `gemma-3-270m`), existing or not."""
        return ModelFolder(name=name, path=self.root / folder_name(name))

    def models(self) -> list[ModelFolder]:
        """The models with a finished trajectory, by name."""
        return [ModelFolder(p.name, p) for p in sorted(self.root.iterdir())
                if p.is_dir() and (p / TRAJECTORY / SUMMARY_FILE).is_file()]

    @property
    def comparison_path(self) -> Path:
        return self.root / COMPARISON

    def comparison(self) -> Stage | None:
        return read_stage(self.comparison_path) if (self.comparison_path / SUMMARY_FILE).is_file() else None

    @property
    def report_path(self) -> Path:
        return self.root / REPORT_FILE

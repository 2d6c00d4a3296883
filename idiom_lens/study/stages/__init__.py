"""The study's stages, one module each: what each writes under OUT/<model>/<stage>/ (`study.layout`).

Each `run_*` takes the model, its probes, the stage folder and the stage's options, and writes its
tables, figures and summary.json; `study.run` calls each through `study.parts.run_stage`, which
reuses a finished stage whose marker verifies. Sweeps run in resumable parts (`study.parts`)
on this process or Ray workers (`study.executors`).
"""

from idiom_lens.study.stages.attention_knockout import run_attention_knockout
from idiom_lens.study.stages.attribution import run_attribution
from idiom_lens.study.stages.knockouts import run_knockouts
from idiom_lens.study.stages.lenses import run_lenses
from idiom_lens.study.stages.patching import run_patching
from idiom_lens.study.stages.recall import write_recall
from idiom_lens.study.stages.tracing import run_tracing
from idiom_lens.study.stages.trajectory import (
    TrajectoryOutputs,
    resumable_trajectory,
    trajectory_sweep,
    write_trajectory_outputs,
)

__all__ = [
    "TrajectoryOutputs", "resumable_trajectory", "run_attention_knockout", "run_attribution", "run_knockouts",
    "run_lenses", "run_patching", "run_tracing", "trajectory_sweep", "write_recall", "write_trajectory_outputs",
]

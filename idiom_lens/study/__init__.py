"""The study: every stage on a model into one results folder (`run_study`), resumable, and the
folder's layout (`StudyFolder`), through which the report, the comparison and the notebook read."""

from idiom_lens.study.layout import ModelFolder, Stage, StudyFolder
from idiom_lens.study.run import StudyOptions, run_study

__all__ = ["ModelFolder", "Stage", "StudyFolder", "StudyOptions", "run_study"]

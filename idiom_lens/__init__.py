"""idiom_lens: how transformer language models recall memorized sequences (idioms, facts).

Data flows one way: datasets -> models -> lenses -> analyses (memorization, trajectory, phases,
attribution, interventions) -> plots -> study (run, layout, report, compare; distributed.py) -> cli,
all on the shared small files (errors, io, types, ...). A module imports only its own floor and
those below it (tests/test_layers.py checks every import).

The names below are the public API a notebook needs; everything else is internal. They are
imported on first use, so `import idiom_lens` (and the CLI's start) stays cheap.

    from idiom_lens import load_model, load_probes, layer_trajectory, analyse_phases, trajectory_figure
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API: dict[str, str] = {
    # data and models
    "Probe": "idiom_lens.datasets.probes",
    "ProbeSet": "idiom_lens.datasets.probes",
    "load_probes": "idiom_lens.datasets",
    "LoadedModel": "idiom_lens.models.loading",
    "load_model": "idiom_lens.models.loading",
    # implants: new idioms fine-tuned into one MLP layer (a known answer for the localizers)
    "ImplantOptions": "idiom_lens.models.implant_store",
    "implant": "idiom_lens.models.implant",
    "ensure_implant": "idiom_lens.models.implant",
    "ImplantResult": "idiom_lens.models.implant",
    "deltas_added": "idiom_lens.models.implant_store",
    "side_effects": "idiom_lens.analyses.implant_effects",
    # lenses
    "Lens": "idiom_lens.lenses.lens",
    "LensSettings": "idiom_lens.lenses.settings",
    "obtain_lens": "idiom_lens.lenses.cache",
    "resolve_lens": "idiom_lens.lenses.cache",
    # analyses
    "predict_next": "idiom_lens.analyses.predict",
    "score_memorization": "idiom_lens.analyses.memorization",
    "MemorizationResult": "idiom_lens.analyses.memorization",
    "layer_trajectory": "idiom_lens.analyses.trajectory",
    "TrajectoryResult": "idiom_lens.analyses.trajectory",
    "analyse_phases": "idiom_lens.analyses.phases",
    "PhaseAnalysis": "idiom_lens.analyses.phases",
    "attribute_probe": "idiom_lens.analyses.attribution",
    "attribute_probes": "idiom_lens.analyses.attribution",
    "AttributionResult": "idiom_lens.analyses.attribution",
    "knockout_grid": "idiom_lens.analyses.interventions.knockouts",
    "KnockoutResult": "idiom_lens.analyses.interventions.knockouts",
    "KnockoutGrid": "idiom_lens.analyses.interventions.knockouts",
    "KnockoutOptions": "idiom_lens.analyses.interventions.knockouts",
    "skip_layers": "idiom_lens.analyses.interventions.skipping",
    "SkipResult": "idiom_lens.analyses.interventions.skipping",
    "SkipOptions": "idiom_lens.analyses.interventions.skipping",
    "patch_probes": "idiom_lens.analyses.interventions.patching",
    "patch": "idiom_lens.analyses.interventions.attribution_patching",
    "PatchingOptions": "idiom_lens.analyses.interventions.patching",
    "CorruptionOptions": "idiom_lens.analyses.interventions.patching",
    "PatchingResult": "idiom_lens.analyses.interventions.patching",
    "value_vector_ranks": "idiom_lens.analyses.interventions.value_vectors",
    "causal_trace": "idiom_lens.analyses.interventions.tracing",
    "TracingResult": "idiom_lens.analyses.interventions.tracing",
    "TracingOptions": "idiom_lens.analyses.interventions.tracing",
    "noise_effects": "idiom_lens.analyses.interventions.noise_designs",
    "NoiseEffectsResult": "idiom_lens.analyses.interventions.noise_designs",
    "attention_knockout": "idiom_lens.analyses.interventions.attention_knockouts",
    "AttentionKnockoutResult": "idiom_lens.analyses.interventions.attention_knockouts",
    "AttentionKnockoutOptions": "idiom_lens.analyses.interventions.attention_knockouts",
    "attribution_patch_probes": "idiom_lens.analyses.interventions.attribution_patching",
    "patching_agreement": "idiom_lens.analyses.interventions.attribution_patching",
    "recall_profile": "idiom_lens.analyses.recall",
    "compare_sets": "idiom_lens.analyses.recall",
    "layer_scores": "idiom_lens.analyses.localization",
    "neuron_precision": "idiom_lens.analyses.localization",
    "LocalizationScores": "idiom_lens.analyses.localization",
    "comparison_sets": "idiom_lens.study.sets",
    "compare_lenses": "idiom_lens.analyses.lens_comparison",
    "LensComparison": "idiom_lens.analyses.lens_comparison",
    # the study
    "run_study": "idiom_lens.study.run",
    "StudyOptions": "idiom_lens.study.run",
    "StudyFolder": "idiom_lens.study.layout",
    "GroundTruthOptions": "idiom_lens.study.ground_truth",
    "run_ground_truth": "idiom_lens.study.ground_truth",
    "LocalizerOptions": "idiom_lens.study.localizers",
    "run_localizers": "idiom_lens.study.localizers",
    # figures
    "trajectory_figure": "idiom_lens.plots.trajectory",
    "promotion_histogram": "idiom_lens.plots.trajectory",
    "layer_contribution_figure": "idiom_lens.plots.attribution",
    "head_heatmap_figure": "idiom_lens.plots.attribution",
    "top_neurons_table": "idiom_lens.plots.attribution",
    "knockout_heatmaps": "idiom_lens.plots.interventions",
    "knockout_layer_curves": "idiom_lens.plots.interventions",
    "skip_curves": "idiom_lens.plots.interventions",
    "patching_heatmaps": "idiom_lens.plots.interventions",
    "tracing_heatmaps": "idiom_lens.plots.tracing",
    "tracing_curves": "idiom_lens.plots.tracing",
    "attention_knockout_curves": "idiom_lens.plots.attention_knockout",
    "where_recall_lives": "idiom_lens.plots.recall",
    "localization_heatmap": "idiom_lens.plots.localization",
    "localization_profiles": "idiom_lens.plots.localization",
    "lens_trajectories_figure": "idiom_lens.plots.lenses",
    "heldout_kl_figure": "idiom_lens.plots.lenses",
    "training_curve_figure": "idiom_lens.plots.lenses",
    "probe_kl": "idiom_lens.lenses.train",
    "training_curve": "idiom_lens.lenses.train",
    "save_figure": "idiom_lens.plots.export",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'idiom_lens' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

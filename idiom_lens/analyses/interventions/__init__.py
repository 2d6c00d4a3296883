"""Causal interventions: MLP neuron knockouts, layer skipping, activation patching (exact and by
attribution), causal tracing, attention knockout, and the authors' value-vector statistic.

Each analysis is a function from (model, probes, options) to a frozen result with
`.to_dataframe()`, `.summary()` and `.save(dir)` / `.load(dir)` (`analyses.saved`). The entry
points are exported here; the building blocks (rankings, controls, runners) stay in their modules.
"""

from idiom_lens.analyses.interventions.knockouts import (
    PAPER_GRID,
    KnockoutResult,
    NeuronRanking,
    knockout_grid,
    rank_neurons,
)
# `attention_knockout` (the function) is not re-exported: it would hide the submodule of the same name.
from idiom_lens.analyses.interventions.attention_knockout import AttentionKnockoutResult
from idiom_lens.analyses.interventions.attribution_patching import attribution_patch_probes, patching_agreement
from idiom_lens.analyses.interventions.patching import PatchingResult, make_corruptions, patch_pair, patch_probes
from idiom_lens.analyses.interventions.skipping import SkipResult, skip_layers
from idiom_lens.analyses.interventions.tracing import TracingResult, causal_trace
from idiom_lens.analyses.interventions.value_vectors import ValueVectorRanks, value_vector_ranks

__all__ = [
    "PAPER_GRID", "AttentionKnockoutResult", "KnockoutResult", "NeuronRanking", "PatchingResult", "SkipResult",
    "TracingResult", "ValueVectorRanks", "attribution_patch_probes", "causal_trace",
    "knockout_grid", "make_corruptions", "patch_pair", "patch_probes", "patching_agreement", "rank_neurons",
    "skip_layers", "value_vector_ranks",
]

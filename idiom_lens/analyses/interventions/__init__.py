"""Causal interventions: MLP neuron knockouts, layer skipping, activation patching, and the
authors' value-vector statistic.

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
from idiom_lens.analyses.interventions.patching import PatchingResult, make_corruptions, patch_pair, patch_probes
from idiom_lens.analyses.interventions.runner import sample_probes
from idiom_lens.analyses.interventions.skipping import SkipResult, skip_layers
from idiom_lens.analyses.interventions.value_vectors import ValueVectorRanks, value_vector_ranks

__all__ = [
    "PAPER_GRID", "KnockoutResult", "NeuronRanking", "PatchingResult", "SkipResult", "ValueVectorRanks",
    "knockout_grid", "make_corruptions", "patch_pair", "patch_probes", "rank_neurons", "sample_probes",
    "skip_layers", "value_vector_ranks",
]

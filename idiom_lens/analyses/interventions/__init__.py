"""Causal interventions: MLP neuron knockouts, layer skipping, activation patching.

Each analysis is a pure function from (model, probes, options) to a frozen result with
`.to_dataframe()`, `.summary()` or heatmap helpers, and `.save(dir)` / `.load(dir)` (analyses.saved).
"""

from idiom_lens.analyses.interventions.knockouts import (
    CONTROLS,
    DEFAULT_CONTROLS,
    DEFAULT_KEEP_TOP_KS,
    DEFAULT_KEEP_TOP_WINDOWS,
    DEFAULT_KS,
    DEFAULT_MODES,
    DEFAULT_WINDOWS,
    PAPER_GRID,
    GridSpec,
    KnockoutConfig,
    KnockoutResult,
    NeuronRanking,
    effective_value_norms,
    knockout_configs,
    knockout_grid,
    matched_neurons,
    neuron_scores,
    post_norm_gains,
    random_neurons,
    rank_neurons,
    value_vector_norms,
)
from idiom_lens.analyses.interventions.patching import (
    SITES,
    WORD_BANK,
    Corruption,
    CorruptionSet,
    PairPatching,
    PatchingResult,
    make_corruptions,
    patch_pair,
    patch_probes,
)
from idiom_lens.analyses.interventions.runner import sample_probes
from idiom_lens.analyses.interventions.skipping import SkipResult, skip_layers, skip_spans
from idiom_lens.analyses.interventions.value_vectors import ValueVectorRanks, value_vector_ranks

__all__ = [
    "CONTROLS", "DEFAULT_CONTROLS", "DEFAULT_KEEP_TOP_KS", "DEFAULT_KEEP_TOP_WINDOWS", "DEFAULT_KS",
    "DEFAULT_MODES", "DEFAULT_WINDOWS", "PAPER_GRID", "SITES", "WORD_BANK",
    "Corruption", "CorruptionSet", "GridSpec", "KnockoutConfig", "KnockoutResult", "NeuronRanking", "PairPatching",
    "PatchingResult", "SkipResult", "ValueVectorRanks", "effective_value_norms", "knockout_configs",
    "knockout_grid", "make_corruptions", "matched_neurons", "neuron_scores", "patch_pair", "patch_probes",
    "post_norm_gains", "random_neurons", "rank_neurons", "sample_probes", "skip_layers", "skip_spans",
    "value_vector_norms", "value_vector_ranks",
]

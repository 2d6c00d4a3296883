"""Causal interventions: MLP neuron knockouts, layer skipping, activation patching.

Each analysis is a pure function from (model, probes, options) to a frozen result with
`.to_dataframe()`, `.summary()` or heatmap helpers, and `.write(dir)` (parquet, atomic).
"""

from idiom_lens.interventions.knockouts import (
    DEFAULT_KEEP_TOP_KS,
    DEFAULT_KS,
    DEFAULT_MODES,
    DEFAULT_WINDOWS,
    KnockoutConfig,
    KnockoutResult,
    NeuronRanking,
    knockout_configs,
    knockout_grid,
    neuron_scores,
    rank_neurons,
    value_vector_norms,
)
from idiom_lens.interventions.patching import (
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
from idiom_lens.interventions.runner import sample_probes
from idiom_lens.interventions.skipping import SkipResult, skip_layers, skip_spans

__all__ = [
    "DEFAULT_KEEP_TOP_KS", "DEFAULT_KS", "DEFAULT_MODES", "DEFAULT_WINDOWS", "SITES", "WORD_BANK",
    "Corruption", "CorruptionSet", "KnockoutConfig", "KnockoutResult", "NeuronRanking", "PairPatching",
    "PatchingResult", "SkipResult", "knockout_configs", "knockout_grid", "make_corruptions",
    "neuron_scores", "patch_pair", "patch_probes", "rank_neurons", "sample_probes", "skip_layers",
    "skip_spans", "value_vector_norms",
]

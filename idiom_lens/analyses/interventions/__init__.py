"""Causal interventions: MLP neuron knockouts, layer skipping, activation patching (exact and by
attribution), causal tracing, attention knockout, and the authors' value-vector statistic.

Each analysis is a function from (model, probes, options) to a frozen result with
`.to_dataframe()`, `.summary()` and `.save(dir)` / `.load(dir)` (`analyses.saved`); its options
are one frozen, validated dataclass (`KnockoutOptions`, `SkipOptions`, `PatchingOptions`,
`TracingOptions`, `AttentionKnockoutOptions`). The entry points and their options are exported
here; the building blocks (rankings, controls, runners) stay in their modules.
"""

from idiom_lens.analyses.interventions.attention_knockouts import (
    AttentionKnockoutOptions,
    AttentionKnockoutResult,
    attention_knockout,
)
from idiom_lens.analyses.interventions.attribution_patching import attribution_patch_probes, patch, patching_agreement
from idiom_lens.analyses.interventions.knockouts import (
    KnockoutCell,
    KnockoutGrid,
    KnockoutOptions,
    KnockoutResult,
    NeuronRanking,
    knockout_grid,
    rank_neurons,
)
from idiom_lens.analyses.interventions.noise_designs import NoiseEffectsResult, noise_effects
from idiom_lens.analyses.interventions.patching import (
    CorruptionOptions,
    PatchingOptions,
    PatchingResult,
    make_corruptions,
    patch_pair,
    patch_probes,
)
from idiom_lens.analyses.interventions.skipping import SkipOptions, SkipResult, skip_layers
from idiom_lens.analyses.interventions.tracing import TracingOptions, TracingResult, causal_trace
from idiom_lens.analyses.interventions.value_vectors import ValueVectorRanks, value_vector_ranks

__all__ = [
    "AttentionKnockoutOptions", "AttentionKnockoutResult", "CorruptionOptions", "KnockoutCell", "KnockoutGrid",
    "KnockoutOptions", "KnockoutResult", "NeuronRanking", "NoiseEffectsResult", "PatchingOptions",
    "PatchingResult", "SkipOptions", "SkipResult", "TracingOptions", "TracingResult", "ValueVectorRanks",
    "attention_knockout", "attribution_patch_probes", "causal_trace", "knockout_grid", "make_corruptions",
    "noise_effects", "patch", "patch_pair", "patch_probes", "patching_agreement", "rank_neurons", "skip_layers",
    "value_vector_ranks",
]

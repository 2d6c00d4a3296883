"""MLP neuron knockouts (method.md section 4, after Geva et al. 2022).

An MLP output is a sum of value vectors (rows of W_out) weighted by the neuron activations
(`mlp.hook_post`, the coefficients). Per probe, the neurons of every layer are ranked at the last
prompt position of the clean pass, and a configuration zeroes the top-k neurons of every layer in
a window of consecutive layers (``zero_top``) or every neuron but the top-k (``keep_top``).

Ranking (``rank_by``):
- ``effective`` (default): the norm of the neuron's actual contribution to the residual stream,
  |activation| x ||value vector * g|| / s, where g is the gain of the norm applied to the MLP's
  output (Gemma's ``ln2_post``, an RMSNorm: y = m / s * g) and s the RMS of the clean MLP output
  m at that position. Without a post-MLP norm (GPT-2, Llama) it is |activation| x ||value vector||.
- ``magnitude``: |activation| x ||W_out row||, the authors' formula taken literally.
- ``dla``: activation x (value vector * g / s) . W_U[:, prediction] (final norm ignored: approximate).

Positions (``positions``): ``all`` (default, the authors' way: their hook sits on the MLP's first
linear layer and acts on the whole sequence) zeroes the chosen neurons at every prompt position;
``last`` (our variant) at the last prompt position only. The neurons are always those of the
clean pass at the last position.

Norm handling (``norm``): ``live`` (default) lets the post-MLP norm renormalise the knocked-out
MLP output (which partly undoes a zeroing: the remaining output is scaled back up); ``frozen``
fixes the norm's scale s at its clean-pass value in the knocked-out layers, so the MLP block's
output becomes (m - removed) * g / s_clean: zeroing removes exactly the neurons' contributions
(the standard "frozen LayerNorm scale"). Identical on models without a post-MLP norm.

Controls (``controls``, the `control` column):
- ``random``: the same number of neurons drawn uniformly (seeded per probe, layer and k);
- ``matched`` (zero_top only): random neurons from outside the top-k whose summed effective score
  matches the top-k's: neurons in a seeded random order (per probe, layer and k), the shortest
  prefix whose sum reaches the top-k's sum, minus its last neuron when that lands closer. When
  the top-k carry more than everything else (large k: activations are heavy-tailed), the match
  falls short (the set is then every other neuron):
  every row reports ``score_ratio`` (the set's summed score / the top-k's, over the window) and
  ``zeroed_share`` (the zeroed neurons' share of the window's summed score) so no reader has to
  trust the name. (For keep_top, a set of the top-k's magnitude drawn outside the top-k would be
  the complement that keep_top already zeroes, so keep_top has the random control only.)
- ``whole_mlp``: every neuron of the window's layers (k = d_mlp), one per window: the ceiling.

Speed: ``positions="last"`` reuses each probe's prefix key/value cache (`PromptRunner`): one token
per configuration. ``positions="all"`` runs whole prompts, resumed at the window's first layer
from the clean residual stream (`SuffixRunner`): the layers below the window are untouched by the
knockout and run once per probe. Configurations of a probe are the rows of a batch. Both paths
are checked against a plain full forward before anything is written and tested against
hand-written full forwards (tests/interventions/test_against_full_forward.py).

Metrics per configuration (on real vocabulary tokens only, `idiom_lens.models.vocab`): whether the
prediction changed, the drop of the clean prediction's probability, whether the new prediction is
the target. Summaries give per set the share changed with n and a 95% Wilson interval.
"""

from idiom_lens.analyses.interventions.knockouts.controls import (
    matched_neurons,
    random_neurons,
)
from idiom_lens.analyses.interventions.knockouts.grid import (
    CONTROLS,
    MODES,
    NORMS,
    POSITIONS,
    RANKINGS,
    KnockoutCell,
    KnockoutGrid,
    KnockoutOptions,
    NormHandling,
    Positions,
    RankBy,
    knockout_cells,
)
from idiom_lens.analyses.interventions.knockouts.result import (
    SUMMARY_KEYS,
    KnockoutResult,
    wilson_columns,
)
from idiom_lens.analyses.interventions.knockouts.scores import (
    NeuronRanking,
    effective_value_norms,
    neuron_scores,
    post_norm_gains,
    rank_neurons,
    rms_gain,
    value_vector_norms,
)
from idiom_lens.analyses.interventions.knockouts.sweep import (
    knockout_grid,
    knockout_hooks,
)

__all__ = [
    "CONTROLS",
    "effective_value_norms",
    "knockout_cells",
    "knockout_grid",
    "knockout_hooks",
    "KnockoutCell",
    "KnockoutGrid",
    "KnockoutOptions",
    "KnockoutResult",
    "matched_neurons",
    "MODES",
    "neuron_scores",
    "NeuronRanking",
    "NormHandling",
    "NORMS",
    "POSITIONS",
    "Positions",
    "post_norm_gains",
    "random_neurons",
    "rank_neurons",
    "RankBy",
    "RANKINGS",
    "rms_gain",
    "SUMMARY_KEYS",
    "value_vector_norms",
    "wilson_columns",
]

"""MLP neuron knockouts (method.md section 4, after Geva et al. 2022 and Haviv et al. 2023).

An MLP output is a sum of value vectors (rows of W_out) weighted by the neuron activations
(`mlp.hook_post`, the coefficients). Per probe, the neurons of every layer are ranked at the last
prompt position of the clean pass, and a configuration knocks out the top-k neurons of every
layer in a window of consecutive layers (``zero_top``) or every neuron but the top-k (``keep_top``).

Ranking (``rank_by``, the `rank_by` column of every table):
- ``effective`` (default; ours): the norm of the neuron's actual contribution to the residual
  stream, |activation| x ||value vector * g|| / s, where g is the gain of the norm applied to the
  MLP's output (Gemma's ``ln2_post``, an RMSNorm: y = m / s * g) and s the RMS of the clean MLP
  output m at that position. Without a post-MLP norm (GPT-2, Llama) it equals ``magnitude``.
- ``magnitude`` (the authors', Haviv et al. 2023): |m| x ||v||, the activation times the norm of
  the raw value vector (W_out row), the post-MLP norm ignored.
- ``dla``: activation x (value vector * g / s) . W_U[:, prediction] (final norm ignored: approximate).

Positions (``positions``): ``all`` (default, the authors' way: their hook sits on the MLP's first
linear layer and acts on the whole sequence) knocks the chosen neurons out at every prompt
position; ``last`` (our variant) at the last prompt position only. The neurons are always those of
the clean pass at the last position.

Norm handling (``norm``, the `norm` column): ``frozen`` (default, the primary result) fixes the
post-MLP norm's scale s at its clean-pass value in the knocked-out layers, so the MLP block's
output becomes (m - removed) * g / s_clean: a knockout removes exactly its neurons' contributions
(the standard "frozen LayerNorm scale"). ``live`` (the secondary result) lets the norm renormalise
the knocked-out output: the layer's output points the same way as under ``frozen`` (an RMSNorm
rescales each position by one number), but its norm is scaled back up, so what remains is
amplified rather than the neurons' share removed (`out_norm_ratio` says by how much: on Gemma 3
270M, zeroing the top-100 neurons of one layer leaves a median 0.52x of the output's norm frozen,
1.27x live). Identical on models without a post-MLP norm.

Ablation (``ablation``, the `ablation` column): ``zero`` (default) sets the knocked-out
activations to 0; ``mean`` sets them to their mean over a reference set (`mean_activations`: the
prompts of the bundled ordinary text, ``load_probes("text")``, every position but BOS; computed
once per model, described in the settings).

Controls (``controls``, the `control` column):
- ``random``: the same number of neurons drawn uniformly (seeded per probe, layer and k);
- ``matched`` (zero_top only): as many neurons as the top-k, from outside it, whose removed vector
  (the sum of activation x value vector x g / s over the set, at the last position, through the
  clean post-norm scale; with a mean ablation, (activation - mean) in place of the activation) has
  the norm of the top-k's: the closest of 256 seeded random sets, then exchanges along the
  removed vector's direction and greedy single exchanges until within 1% (`matched_neurons`;
  where no set of that size gets there, the closest found). Every row reports
  ``matched_norm_ratio`` (the norm of the vector the row's set removes / the targeted set's), so
  no reader has to trust the name;
- ``matched_score`` (zero_top only; the earlier "magnitude-matched" control, kept to compare):
  random neurons outside the top-k whose summed effective score matches the top-k's (seeded
  order, shortest prefix reaching the sum; `score_matched_neurons`). Scalar scores add where the
  vectors cancel: on Gemma 3 270M (6 idioms, top-100, every layer) such a set removes a vector of
  median 0.41x the norm of the top-100's; the ``matched`` set median 0.95x (within 1% in 44% of
  the layers, at least 0.5x in all), 100 random neurons 0.21x. Its rows
  report ``score_ratio`` (the set's summed score / the top-k's) and ``zeroed_share`` (the zeroed
  neurons' share of the window's summed score);
- ``whole_mlp``: every neuron of the window's layers (k = d_mlp), one per window: the ceiling.
(For keep_top, a set drawn outside the top-k would be the complement that keep_top already
zeroes, so keep_top has the random control only.)

Output diagnostics per row (`output_diagnostics`), at the last prompt position, from the MLP
layers' outputs as written into the residual stream (`hook_mlp_out`: after the post-MLP norm
where there is one), summed over the window: ``n_zeroed`` (neurons knocked out), ``removed_norm``
(||clean output - knocked output||), ``out_cosine`` (the knocked output's cosine with the clean
one) and ``out_norm_ratio`` (||knocked|| / ||clean||). `KnockoutResult.layer_table` gives their
means per set, control and layer.

Speed: ``positions="last"`` reuses each probe's prefix key/value cache (`PromptRunner`): one token
per configuration. ``positions="all"`` runs whole prompts, resumed at the window's first layer
from the clean residual stream (`SuffixRunner`): the layers below the window are untouched by the
knockout and run once per probe. Configurations of a probe are the rows of a batch. Both paths
are checked against a plain full forward before anything is written and tested against
hand-written full forwards (tests/analyses/interventions/test_against_full_forward.py).

Metrics per configuration (on real vocabulary tokens only, `idiom_lens.models.vocab`): whether the
prediction changed, the drop of the clean prediction's probability, whether the new prediction is
the target. Summaries give per set the share changed with n and a 95% Wilson interval.
"""

from idiom_lens.analyses.interventions.knockouts.controls import (
    MATCH_CANDIDATES,
    MATCH_TOLERANCE,
    matched_neurons,
    random_neurons,
    score_matched_neurons,
)
from idiom_lens.analyses.interventions.knockouts.grid import (
    ABLATIONS,
    CONTROLS,
    DEFAULT_CONTROLS,
    MODES,
    NORMS,
    POSITIONS,
    RANKINGS,
    Ablation,
    KnockoutCell,
    KnockoutGrid,
    KnockoutOptions,
    NormHandling,
    Positions,
    RankBy,
    knockout_cells,
)
from idiom_lens.analyses.interventions.knockouts.result import (
    DIAGNOSTICS,
    SUMMARY_KEYS,
    KnockoutResult,
    wilson_columns,
)
from idiom_lens.analyses.interventions.knockouts.scores import (
    MEAN_REFERENCE,
    MeanActivations,
    NeuronRanking,
    effective_value_norms,
    effective_value_vectors,
    mean_activations,
    neuron_scores,
    post_norm_gains,
    rank_neurons,
    rms_gain,
    value_vector_norms,
)
from idiom_lens.analyses.interventions.knockouts.sweep import (
    knockout_grid,
    knockout_hooks,
    output_capture_hooks,
    output_diagnostics,
)

__all__ = [
    "Ablation",
    "ABLATIONS",
    "CONTROLS",
    "DEFAULT_CONTROLS",
    "DIAGNOSTICS",
    "effective_value_norms",
    "effective_value_vectors",
    "knockout_cells",
    "knockout_grid",
    "knockout_hooks",
    "KnockoutCell",
    "KnockoutGrid",
    "KnockoutOptions",
    "KnockoutResult",
    "MATCH_CANDIDATES",
    "MATCH_TOLERANCE",
    "matched_neurons",
    "mean_activations",
    "MEAN_REFERENCE",
    "MeanActivations",
    "MODES",
    "neuron_scores",
    "NeuronRanking",
    "NormHandling",
    "NORMS",
    "output_capture_hooks",
    "output_diagnostics",
    "POSITIONS",
    "Positions",
    "post_norm_gains",
    "random_neurons",
    "rank_neurons",
    "RankBy",
    "RANKINGS",
    "rms_gain",
    "score_matched_neurons",
    "SUMMARY_KEYS",
    "value_vector_norms",
    "wilson_columns",
]

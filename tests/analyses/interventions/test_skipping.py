"""Layer skipping invariants on the tiny random Gemma 3."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import logit_atol, prob_atol, probes_prob_atol  # tests/tolerances.py: why each bound

from idiom_lens.analyses.interventions import SkipOptions, skip_layers
from idiom_lens.analyses.interventions.skipping import skip_spans
from idiom_lens.errors import InputError
from idiom_lens.models.forward import tokenize_probes

from .test_against_full_forward import masked


def test_skipping_no_layer_changes_nothing(tiny_model, probes):
    result = skip_layers(tiny_model, probes, SkipOptions(spans=[(), (1,)]))
    empty = result.rows[result.rows["window"] == 0]
    assert len(empty) == len(probes)
    assert not empty["changed"].any()
    assert empty["prob_drop"].abs().max() < probes_prob_atol(tiny_model, probes)  # clean vs batched rows: fp32 noise


@pytest.mark.parametrize("span", [(1,), (0, 1), (0, 1, 2)])
def test_skip_matches_manual_bypass(tiny_model, probes, span):
    """Skipping layers a..b == the residual after b replaced by the residual entering a (all positions)."""
    result = skip_layers(tiny_model, probes[:3], SkipOptions(spans=[span]))
    for t, row in zip(tokenize_probes(tiny_model, probes[:3]), result.rows.itertuples()):
        tokens = torch.tensor([t.prompt_ids])
        store = {}

        def keep(x, hook):
            store["x"] = x.clone()  # noqa: B023 (called within this iteration)

        def put(x, hook):
            return store["x"]  # noqa: B023 (called within this iteration)

        with torch.no_grad():
            logits = tiny_model.bridge.run_with_hooks(
                tokens,
                fwd_hooks=[(f"blocks.{span[0]}.hook_resid_pre", keep), (f"blocks.{span[-1]}.hook_resid_post", put)],
            )[0, -1]
        scale = float(logits.abs().max())
        logits = masked(tiny_model, logits)  # predictions range over real vocabulary tokens
        best = int(logits.argmax())
        assert row.new_pred_id == best or float(logits[best] - logits[row.new_pred_id]) <= logit_atol(tiny_model, scale)
        assert row.prob_of_clean_pred == pytest.approx(float(logits.softmax(-1)[row.clean_pred_id]),
                                                       abs=prob_atol(tiny_model, scale))  # fp32: batch vs one forward


def test_last_position_skip_differs_from_full_skip(tiny_model, probes):
    full = skip_layers(tiny_model, probes[:4], SkipOptions(windows=(1,), positions="all")).rows
    last = skip_layers(tiny_model, probes[:4], SkipOptions(windows=(1,), positions="last")).rows
    assert len(full) == len(last) == 4 * 3
    # skipping the last layer is the same at the last position (no later layer reads other positions)
    top = tiny_model.n_layers - 1
    np.testing.assert_allclose(full.loc[full["start"] == top, "prob_of_clean_pred"],
                               last.loc[last["start"] == top, "prob_of_clean_pred"],
                               atol=probes_prob_atol(tiny_model, probes[:4]))  # other batches: fp32 noise
    assert not np.allclose(full["prob_of_clean_pred"], last["prob_of_clean_pred"])


def test_batched_equals_unbatched(tiny_model, probes):
    a = skip_layers(tiny_model, probes[:4], batch_size=1).rows
    b = skip_layers(tiny_model, probes[:4], batch_size=64).rows
    assert np.array_equal(a["new_pred_id"], b["new_pred_id"])
    np.testing.assert_allclose(a["prob_of_clean_pred"], b["prob_of_clean_pred"],
                               atol=probes_prob_atol(tiny_model, probes[:4]))  # batch shapes: fp32 noise


def test_spans_summary_and_validation(tiny_model, probes, tmp_path):
    assert skip_spans(18) == skip_spans(18, (1, 2, 3, 4, 5)) and len(skip_spans(18)) == 80
    result = skip_layers(tiny_model, probes)
    assert len(result.rows) == len(probes) * len(skip_spans(3, (1, 2, 3)))
    assert result.summary()["changed"].between(0, 1).all()
    assert all((tmp_path / p).exists() for p in result.save(tmp_path))
    with pytest.raises(InputError, match="outside"):
        skip_layers(tiny_model, probes, SkipOptions(spans=[(7,)]))
    with pytest.raises(InputError, match="window"):
        skip_layers(tiny_model, probes, SkipOptions(windows=(4,)))

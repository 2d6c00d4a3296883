"""Activation patching invariants on the tiny random Gemma 3, and a cross-check with TransformerLens."""

from __future__ import annotations

import pytest
import torch
from tolerances import logit_atol, logit_scale  # tests/tolerances.py: why each bound

from idiom_lens.analyses.interventions import (
    CorruptionOptions,
    PatchingOptions,
    make_corruptions,
    patch_pair,
    patch_probes,
)
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError

# Words the tiny tokenizer knows as single tokens (trained on the fixture corpus).
BANK = ("moon", "eye", "stone", "room", "cake", "ice", "mat", "book", "market", "history", "cat", "walked")


def test_corruptions_keep_token_length_and_are_deterministic(tiny_model, probes):
    a = make_corruptions(tiny_model, probes, CorruptionOptions(bank=BANK, seed=0))
    b = make_corruptions(tiny_model, probes, CorruptionOptions(bank=BANK, seed=0))
    c = make_corruptions(tiny_model, probes, CorruptionOptions(bank=BANK, seed=1))
    assert a == b
    assert a.to_dataframe()["corrupted_prompt"].tolist() != c.to_dataframe()["corrupted_prompt"].tolist()
    assert len(a.pairs) > 0
    for pair in a.pairs:
        assert len(pair.clean_ids) == len(pair.corrupted_ids) and pair.clean_ids != pair.corrupted_ids
        clean_words, corr_words = pair.clean_prompt.split(), pair.corrupted_prompt.split()
        assert len(clean_words) == len(corr_words)
        if pair.variant == "prefix_swap":
            assert corr_words[-2:] == clean_words[-2:]
        else:
            assert sum(x != y for x, y in zip(clean_words, corr_words)) == 1
    # a 2-word prompt cannot keep its last 2 words and change something: reported, not dropped silently
    short = [Probe("s", "break the", "ice", "idiom")]
    result = make_corruptions(tiny_model, short, CorruptionOptions(bank=BANK, variants=("prefix_swap",)))
    assert result.pairs == () and result.skipped[0][0] == "s"
    nothing_fits = make_corruptions(tiny_model, short,
                                    CorruptionOptions(bank=("extraordinarily",), variants=("word_swap",)))
    assert nothing_fits.pairs == () and "token" in nothing_fits.skipped[0][2]


def _pair(tiny_model, probes):
    corruptions = make_corruptions(tiny_model, probes, CorruptionOptions(bank=BANK, variants=("word_swap",)))
    return next(p for p in corruptions.pairs)


def test_patching_clean_into_clean_restores_all_and_corrupted_into_corrupted_nothing(tiny_model, probes):
    pair = _pair(tiny_model, probes)
    kw = dict(clean_ids=pair.clean_ids, corrupted_ids=pair.corrupted_ids, target_id=pair.target_id)
    same_clean = patch_pair(tiny_model, sender="clean", receiver="clean", **kw)
    same_corr = patch_pair(tiny_model, sender="corrupted", receiver="corrupted", **kw)
    total = abs(same_clean.clean_logit - same_clean.corrupted_logit)
    assert total > 1e-3
    # restored = (patched - corrupted) / total: fp32 logit noise of batched rows, over the total effect
    atol = 2 * logit_atol(tiny_model, logit_scale(tiny_model, pair.clean_ids)) / total
    torch.testing.assert_close(same_clean.restored, torch.ones_like(same_clean.restored), atol=atol, rtol=0)
    torch.testing.assert_close(same_corr.restored, torch.zeros_like(same_corr.restored), atol=atol, rtol=0)


@pytest.mark.parametrize("word_index", [1, 2, 3, 4])
def test_patching_the_swapped_token_at_layer_0_restores_everything(tiny_model, word_index: int) -> None:
    """Layer-0 resid_pre patched at the one swapped token turns the corrupted run into the clean one.

    The pair is built so that exactly one token differs (a one-token word of the tiny vocabulary
    swapped for another, at a fixed word); if the restored share there is not 1, or another
    position restores anything, patching writes to the wrong cell or not at all.
    """
    probe = Probe("k", "kill two birds with one", "stone", "idiom")
    options = CorruptionOptions(bank=BANK, variants=("word_swap",), word_index=word_index)
    pairs = make_corruptions(tiny_model, [probe], options).pairs
    assert len(pairs) == 1
    pair = pairs[0]
    differ = [i for i, (a, b) in enumerate(zip(pair.clean_ids, pair.corrupted_ids)) if a != b]
    assert len(differ) == 1  # the construction above guarantees a one-token swap
    assert differ[0] == word_index + 1  # after BOS, word i is token i + 1 in this vocabulary
    result = patch_pair(tiny_model, clean_ids=pair.clean_ids, corrupted_ids=pair.corrupted_ids,
                        target_id=pair.target_id, sites=("resid_pre",))
    total = abs(result.clean_logit - result.corrupted_logit)
    assert total > 0.05  # a gap worth restoring
    atol = 2 * logit_atol(tiny_model, logit_scale(tiny_model, pair.clean_ids)) / total  # fp32 noise over the gap
    restored = result.restored[0, 0]  # resid_pre of layer 0, every position
    assert float(restored[differ[0]]) == pytest.approx(1.0, abs=atol)
    same = [i for i in range(len(pair.clean_ids)) if i != differ[0]]
    torch.testing.assert_close(restored[same], torch.zeros(len(same)), atol=atol, rtol=0)


def test_matches_transformer_lens_patching(tiny_model, probes):
    """Our batched patching equals transformer_lens.patching.get_act_patch_* run on the bridge."""
    from transformer_lens import patching

    pair = _pair(tiny_model, probes)
    clean = torch.tensor([pair.clean_ids])
    corrupted = torch.tensor([pair.corrupted_ids])
    with torch.no_grad():
        _, cache = tiny_model.bridge.run_with_cache(clean)

    def metric(logits):
        return logits[0, -1, pair.target_id]

    ours = patch_pair(tiny_model, clean_ids=pair.clean_ids, corrupted_ids=pair.corrupted_ids,
                      target_id=pair.target_id, batch_size=7)
    for i, fn in enumerate((patching.get_act_patch_resid_pre, patching.get_act_patch_attn_out,
                            patching.get_act_patch_mlp_out)):
        with torch.no_grad():
            reference = fn(tiny_model.bridge, corrupted, cache, metric)
        # fp32: our batched rows vs TransformerLens's one forward per cell: logit noise
        torch.testing.assert_close(ours.patched[i], reference.float(), atol=logit_atol(tiny_model, reference), rtol=0)


def test_patch_probes_frame_and_validation(tiny_model, probes, tmp_path):
    result = patch_probes(tiny_model, probes[:6],
                          PatchingOptions(corruption=CorruptionOptions(bank=BANK), sites=("resid_pre", "mlp_out")))
    frame = result.to_dataframe()
    n_rows = sum(2 * tiny_model.n_layers * n for n in result.pairs["n_tokens"])
    assert len(frame) == n_rows
    assert (frame["pos_from_end"] < 0).all()
    heat = result.mean_heatmap(site="resid_pre", variant="word_swap")
    assert heat.shape[0] == tiny_model.n_layers and heat.columns.max() == -1
    invalid = result.pairs[~result.pairs["valid"]]
    assert frame[frame["probe_id"].isin(invalid["probe_id"]) & ~frame["valid"]]["restored"].isna().all()
    assert all((tmp_path / p).exists() for p in result.save(tmp_path))
    with pytest.raises(InputError, match="same token length"):
        patch_pair(tiny_model, clean_ids=(1, 2, 3), corrupted_ids=(1, 2), target_id=3)
    with pytest.raises(InputError, match="sites"):
        patch_pair(tiny_model, clean_ids=(1, 2), corrupted_ids=(1, 3), target_id=3, sites=("q",))

"""Layer trajectory: invariants against the model's output, batching, TransformerLens and HF."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import assert_ranks_agree, entropy_atol, logit_atol, prob_atol, probes_prob_atol

from idiom_lens.analyses.memorization import score_memorization
from idiom_lens.analyses.trajectory import (
    TRAJECTORY_SITES,
    TrajectoryResult,
    layer_trajectory,
    load_trajectory,
    save_trajectory,
)
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.loading import LoadedModel, load_model
from idiom_lens.models.readout import read_out
from idiom_lens.models.tokenization import split_probe
from idiom_lens.models.vocab import valid_mask


@pytest.fixture(scope="module")
def tiny_result(tiny_model, probes):
    return layer_trajectory(tiny_model, probes, batch_size=4)


def test_last_layer_equals_model_output(tiny_model, probes, tiny_result):
    s = tiny_result.site("resid_post")
    mem = tiny_result.memorization.to_dataframe()
    assert (tiny_result.pred_rank[:, s, -1] == 0).all()
    atol = probes_prob_atol(tiny_model, probes)  # two batched forwards (lens, memorization): fp32 noise
    np.testing.assert_allclose(tiny_result.pred_prob[:, s, -1], mem["pred_prob"], atol=atol)
    np.testing.assert_allclose(tiny_result.target_prob[:, s, -1], mem["target_prob"], atol=atol)
    assert (tiny_result.target_rank[:, s, -1] == mem["target_rank"]).all()
    assert (tiny_result.top_id[:, s, -1] == mem["pred_id"]).all()
    # entropy of the model's own output distribution
    toks = tokenize_probes(tiny_model, probes[:1])[0]
    with torch.no_grad():
        logits = tiny_model.bridge(torch.tensor([toks.prompt_ids]))[0, -1]
    lp = logits[valid_mask(tiny_model)].log_softmax(-1)  # over real vocabulary tokens
    assert tiny_result.entropy[0, s, -1] == pytest.approx(float(-(lp.exp() * lp).sum()),
                                                          abs=entropy_atol(tiny_model, logits))  # fp32, batch vs one


def test_batch_size_and_padding_do_not_change_results(tiny_model, probes, tiny_result):
    one = layer_trajectory(tiny_model, probes, batch_size=1)
    big = layer_trajectory(tiny_model, probes, batch_size=32)
    atol = probes_prob_atol(tiny_model, probes)  # batch shapes and padding: fp32 noise
    for other in (one, big):
        for metric in ("pred_rank", "target_rank", "top_id"):
            np.testing.assert_array_equal(getattr(other, metric), getattr(tiny_result, metric))
        for metric in ("pred_prob", "target_prob"):
            np.testing.assert_allclose(getattr(other, metric), getattr(tiny_result, metric), atol=atol)
        np.testing.assert_allclose(other.entropy, tiny_result.entropy, atol=atol * (np.log(tiny_model.d_vocab) + 1))


def test_readout_agrees_with_transformer_lens_logit_readout(tiny_model, probes):
    from transformer_lens.tools.analysis import logit_readout

    torch.manual_seed(0)
    vectors = torch.randn(7, tiny_model.d_model)
    tracked = torch.randint(0, tiny_model.d_vocab, (7, 2))
    ours = read_out(tiny_model, vectors, tracked, mask_special=False, chunk_rows=3)  # TL does not mask
    # one final norm and unembedding, in other chunks and kernels: one block's worth of fp32 noise
    with torch.no_grad():
        scale = tiny_model.bridge.unembed(tiny_model.bridge.ln_final(vectors.unsqueeze(0)))
    for j in range(2):
        theirs = logit_readout(tiny_model.bridge, vectors, targets=tracked[:, j], return_type="log_probs")
        torch.testing.assert_close(ours.logprob[:, j], theirs.values[:, 0],
                                   atol=prob_atol(tiny_model, scale, n_layers=1), rtol=0)
        assert torch.equal(ours.rank[:, j], theirs.target_ranks[:, 0])
        torch.testing.assert_close(ours.entropy, theirs.entropy, atol=entropy_atol(tiny_model, scale, n_layers=1),
                                   rtol=0)


def test_sites_are_the_hooked_activations(tiny_model, probes, tiny_result):
    """mlp_out at layer l read alone equals reading the hook value directly."""
    toks = tokenize_probes(tiny_model, probes[:1])[0]
    _, cache = tiny_model.bridge.run_with_cache(torch.tensor([toks.prompt_ids]))
    record = tiny_result.memorization.records[0]
    for site, hook in (("mlp_out", "blocks.1.hook_mlp_out"), ("resid_mid", "blocks.1.hook_resid_mid")):
        vec = cache[hook][0, -1:]
        ro = read_out(tiny_model, vec, torch.tensor([[record.pred_id, record.target_id]]))
        s = tiny_result.site(site)
        assert int(ro.rank[0, 0]) == tiny_result.pred_rank[0, s, 1]
        assert float(ro.logprob[0, 1].exp()) == pytest.approx(tiny_result.target_prob[0, s, 1],
                                                              abs=probes_prob_atol(tiny_model, probes[:1]))  # fp32


def test_tidy_frame_and_parquet_round_trip(tiny_result, tmp_path):
    frame = tiny_result.to_dataframe()
    n_probes = len(tiny_result.memorization)
    assert len(frame) == n_probes * len(TRAJECTORY_SITES) * tiny_result.n_layers
    assert {"probe_id", "kind", "group", "memorized", "layer", "site", "pred_rank", "pred_prob",
            "target_rank", "target_prob", "entropy"} <= set(frame.columns)
    save_trajectory(tiny_result, tmp_path)
    back = load_trajectory(tmp_path, settings=tiny_result.settings)
    for metric in ("pred_rank", "pred_prob", "target_rank", "entropy"):
        np.testing.assert_array_equal(getattr(back, metric), getattr(tiny_result, metric))
    assert back.memorization.records == tiny_result.memorization.records


def test_concat_of_parts_equals_whole(tiny_model, probes, tiny_result):
    parts = [layer_trajectory(tiny_model, probes[:4]), layer_trajectory(tiny_model, probes[4:])]
    joined = TrajectoryResult.join_parts(parts)
    np.testing.assert_array_equal(joined.pred_rank, tiny_result.pred_rank)


# Teacher-forced full_target_match on the tiny Gemma 3. The targets are the model's own greedy
# continuations of "blind room" (" room" "v" "v" "v"), and the same word with a wrong sub-word;
# the tests check these premises by hand before relying on them.
FULL_MATCH_CASES: list[tuple[str, str, int, bool, bool]] = [
    # (prompt, target, n_target_tokens, memorized, full_target_match)
    ("blind room", "roomvvv", 4, True, True),  # each sub-word is the greedy choice after the previous ones
    ("blind room", "roomvv", 3, True, True),
    ("blind room", "room", 1, True, True),  # one sub-word: full match = memorized
    ("blind room", "roomvvZ", 4, True, False),  # the first 3 sub-words are greedy, the last is not
    ("blind room", "roomZvv", 4, True, False),  # the second sub-word is not greedy
    ("blind room", "moon", 1, False, False),  # not memorized
]


def _greedy_by_hand(model: LoadedModel, prompt: str, target: str) -> tuple[int, ...]:
    """Greedy next token at the last prompt position and after each target sub-word but the last."""
    toks = split_probe(model.tokenizer, prompt, target)
    with torch.no_grad():
        logits = model.bridge(torch.tensor([toks.prompt_ids + toks.target_ids]))[0]
    n = len(toks.prompt_ids)
    return tuple(logits[n - 1 : n - 1 + len(toks.target_ids)].argmax(-1).tolist())


def test_full_target_match_true_and_false_on_multi_token_targets(tiny_model, probes) -> None:
    """full_target_match is True exactly when every target sub-word is the teacher-forced greedy choice.

    It fails if the flag is constant, only looks at the first sub-word (= memorized), or reads the
    greedy tokens one position off.
    """
    extra = [Probe(id=f"ftm{i}", prompt=p, target=t, kind="idiom") for i, (p, t, *_) in enumerate(FULL_MATCH_CASES)]
    for prompt, target, n_tokens, memorized, full in FULL_MATCH_CASES:  # premises, by hand
        target_ids = split_probe(tiny_model.tokenizer, prompt, target).target_ids
        assert len(target_ids) == n_tokens
        greedy = _greedy_by_hand(tiny_model, prompt, target)
        assert (greedy[0] == target_ids[0], greedy == target_ids) == (memorized, full), (prompt, target)
    # mixed with the fixture probes so batches are padded to different lengths
    trajectory = layer_trajectory(tiny_model, [*probes, *extra], sites=["resid_post"], batch_size=4)
    scored = score_memorization(tiny_model, [*extra, *probes], batch_size=3)
    for records in (trajectory.memorization.records[len(probes):], scored.records[: len(extra)]):
        got = [(r.target, r.n_target_tokens, r.memorized, r.full_target_match) for r in records]
        expected = [(t, n, m, f) for _, t, n, m, f in FULL_MATCH_CASES]
        assert got == expected


def test_readout_through_the_final_norm_by_hand(shaped_norm_model_dir) -> None:
    """The read-out goes through the model's own final norm, then W_U.

    Computed by hand from the Hugging Face weights (Gemma 3 RMSNorm: x / rms(x) * (1 + w), tied
    unembedding, no bias or softcap). It fails if the norm is skipped, or if the norm's weight
    or its rescaling is dropped.
    """
    from transformers import AutoModelForCausalLM

    model = load_model(str(shaped_norm_model_dir), mode="raw", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(shaped_norm_model_dir)).eval()
    assert hf.config.final_logit_softcapping is None and hf.lm_head.bias is None
    torch.manual_seed(0)
    vectors = 3.0 * torch.randn(8, model.d_model)
    with torch.no_grad():
        by_hand = {
            True: hf.lm_head(hf.model.norm(vectors)).float(),
            False: (vectors @ hf.lm_head.weight.T).float(),
        }
    # the shaped norm changes which token wins on some rows, so a wrong path cannot pass by accident
    assert (by_hand[True].argmax(-1) != by_hand[False].argmax(-1)).any()
    tracked = torch.stack([by_hand[True].argmax(-1), by_hand[False].argmax(-1)], dim=1)
    logits = by_hand[True]
    ro = read_out(model, vectors, tracked, mask_special=False, chunk_rows=3)
    logprobs = logits.log_softmax(-1)
    assert torch.equal(ro.top_id, logits.argmax(-1))
    # one final norm and unembedding, ours vs HF's modules: one block's worth of fp32 noise
    torch.testing.assert_close(ro.logprob, logprobs.gather(1, tracked), atol=prob_atol(model, logits, n_layers=1),
                               rtol=0)
    assert torch.equal(ro.rank, (logits[:, None, :] > logits.gather(1, tracked)[:, :, None]).sum(-1))
    torch.testing.assert_close(ro.entropy, -(logprobs.exp() * logprobs).sum(-1),
                               atol=entropy_atol(model, logits, n_layers=1), rtol=0)


def test_trajectory_last_layer_is_the_output_with_a_shaped_final_norm(shaped_norm_model_dir, probes) -> None:
    """With a final norm that is not the identity, the last layer's read-out is still the model's output.

    It fails if the trajectory reads through a norm without its weight, or through no norm.
    """
    model = load_model(str(shaped_norm_model_dir), mode="raw", progress=False)
    result = layer_trajectory(model, probes, sites=["resid_post"], batch_size=4)
    mem = result.memorization.to_dataframe()
    assert (result.top_id[:, 0, -1] == mem["pred_id"]).all()
    atol = probes_prob_atol(model, probes)  # two batched forwards: fp32 noise
    np.testing.assert_allclose(result.pred_prob[:, 0, -1], mem["pred_prob"], atol=atol)
    np.testing.assert_allclose(result.target_prob[:, 0, -1], mem["target_prob"], atol=atol)
    assert (result.target_rank[:, 0, -1] == mem["target_rank"]).all()


def test_bad_options(tiny_model, probes):
    with pytest.raises(InputError, match="unknown sites"):
        layer_trajectory(tiny_model, probes, sites=["resid_pre_typo"])
    with pytest.raises(InputError, match="no probes"):
        layer_trajectory(tiny_model, [])
    with pytest.raises(InputError, match="batch_size"):
        layer_trajectory(tiny_model, probes, batch_size=0)


@pytest.mark.embedded
def test_embedded_matches_independent_hugging_face_lens_and_batching(embedded_model):
    """Our batched TL path vs a plain per-probe HF computation, and batch size 1 vs 16 (padded)."""
    from reference import load_hf_model, reference_trajectory

    from idiom_lens.datasets import load_probes

    probes = list(load_probes("idioms").probes[:16])
    ours = layer_trajectory(embedded_model, probes, sites=["resid_post"], batch_size=16)
    single = layer_trajectory(embedded_model, probes[:12], sites=["resid_post"], batch_size=1)
    from idiom_lens.models.vocab import masked_token_ids

    masked = masked_token_ids(embedded_model.tokenizer, embedded_model.d_vocab)  # the same definition, masked by hand
    # every layer's logits are within fp32 noise (logit_atol at the largest logit the reference
    # saw) of any correct computation's; between two of them, the gap of two tokens' logits moves by
    # up to 4 logit_atol, so a rank may move by the tokens within that of the reference's logit
    ref = reference_trajectory(load_hf_model(embedded_model.source_path), tokenize_probes(embedded_model, probes[:12]),
                               masked_ids=masked, tie_atol=lambda scale: 4 * logit_atol(embedded_model, scale))
    atol = prob_atol(embedded_model, ref["logit_scale"])

    mem = ours.memorization.to_dataframe()
    assert (mem["pred_id"].to_numpy()[:12] == ref["pred_id"]).all()
    for other in (single, ref):  # batch 1 vs 16; Hugging Face vs TransformerLens
        get = (lambda m: other[m]) if isinstance(other, dict) else (lambda m: getattr(other, m)[:, 0])  # noqa: B023 (called within this iteration)
        for name in ("pred", "target"):
            a, b = ours.__getattribute__(f"{name}_rank")[:12, 0], get(f"{name}_rank")
            # two correct computations may reorder a token among the others whose logits lie
            # within fp32 noise of its own (deep in the 262k-token tail, near ties are common)
            assert_ranks_agree(a, b, ref[f"{name}_ties"])
            np.testing.assert_allclose(ours.__getattribute__(f"{name}_prob")[:12, 0], get(f"{name}_prob"), atol=atol)


def test_special_tokens_are_masked_in_every_read_out(tiny_model):
    """A vector pointing at a special token's unembedding: unmasked it is the top token; masked it
    never is, it never counts in a rank, and the probabilities are a softmax over real tokens."""
    valid = valid_mask(tiny_model)
    special = [int(i) for i in (~valid).nonzero().flatten()]
    assert special == sorted({0, 1, 2})  # <pad>, <bos>, <eos> of the tiny tokenizer
    W_U = tiny_model.bridge.W_U.detach()
    vectors = torch.stack([W_U[:, i] * 50 for i in special])
    real = int(valid.nonzero()[0])
    tracked = torch.tensor([[i, real] for i in special])
    bare = read_out(tiny_model, vectors, tracked, mask_special=False)
    assert bare.top_id.tolist() == special and (bare.rank[:, 0] == 0).all()
    ro = read_out(tiny_model, vectors, tracked)
    assert not any(int(t) in special for t in ro.top_id)
    with torch.no_grad():
        normed = tiny_model.bridge.ln_final(vectors.unsqueeze(0)).squeeze(0)
    logits = normed @ W_U + (tiny_model.bridge.b_U if tiny_model.bridge.b_U is not None else 0)
    for row in range(len(special)):
        by_hand = logits[row, valid].log_softmax(-1)
        real_logit = logits[row, real]
        assert float(ro.logprob[row, 1]) == pytest.approx(float(by_hand[int(valid[:real].sum())]),
                                                          abs=prob_atol(tiny_model, logits[row], n_layers=1))  # fp32
        assert int(ro.rank[row, 1]) == int((logits[row, valid] > real_logit).sum())
        assert float(ro.logprob[row, 0].exp()) == 0.0
    assert torch.equal(ro.top_id, torch.where(valid, logits, -torch.inf).argmax(-1))

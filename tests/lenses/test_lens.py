"""Lenses read layers as the obvious computation says, save and load exactly, and refuse other models."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from tolerances import probes_prob_atol  # tests/tolerances.py: why each bound

from idiom_lens.analyses.trajectory import layer_trajectory
from idiom_lens.errors import InputError
from idiom_lens.lenses.lens import Lens, identity_tuned_lens, logit_lens
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.vocab import mask_logits, valid_mask

METRICS = ("pred_rank", "pred_prob", "target_rank", "target_prob", "entropy", "top_id")


def _random_lens(model, kind: str, seed: int = 0) -> Lens:
    n, d = model.n_layers, model.d_model
    g = torch.Generator().manual_seed(seed)
    if kind == "tuned":
        weight, bias = 0.3 * torch.randn(n, d, d, generator=g), torch.randn(n, d, generator=g)
        weight[-1], bias[-1] = 0, 0
        translators = {"weight": weight, "bias": bias}
    else:
        J = torch.eye(d).repeat(n, 1, 1) + 0.3 * torch.randn(n, d, d, generator=g)
        J[-1] = torch.eye(d)
        translators = {"J": J}
    return Lens(kind=kind, model_name=model.name, n_layers=n, d_model=d, translators=translators)


def _naive(model, probe_tokens, lens: Lens, layer: int, token: int) -> tuple[int, float]:
    """Rank and probability of `token` at the last prompt position, read by hand: a plain forward with a
    cache, the translator written out, the final norm, the unembedding, the vocabulary mask."""
    tokens = torch.tensor([probe_tokens.prompt_ids])
    _, cache = model.bridge.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_resid_post"))
    h = cache[f"blocks.{layer}.hook_resid_post"][0, -1].double()
    if lens.kind == "tuned" and layer < model.n_layers - 1:
        h = h + h @ lens.translators["weight"][layer].double() + lens.translators["bias"][layer].double()
    elif lens.kind == "jacobian" and layer < model.n_layers - 1:
        h = lens.translators["J"][layer].double() @ h
    x = model.bridge.ln_final(h.float()[None, None])[0, 0]
    logits = mask_logits(x @ model.bridge.W_U + model.bridge.b_U, valid_mask(model)).double()
    probs = logits.softmax(-1)
    return int((logits > logits[token]).sum()), float(probs[token].detach())


def test_identity_lenses_reproduce_the_logit_lens(tiny_model, probes):
    """Ids and ranks exactly; probabilities and entropies within fp32 noise: the lens path reads
    one site in other read-out batches, whose sums some kernels order differently (seen with
    forced AVX2 at one thread)."""
    plain = layer_trajectory(tiny_model, probes)
    atol = probes_prob_atol(tiny_model, probes)
    for lens in (logit_lens(tiny_model), identity_tuned_lens(tiny_model)):
        sites = ("resid_post",)
        through = layer_trajectory(tiny_model, probes, sites=sites, lens=lens)
        for metric in METRICS:
            got, want = getattr(through, metric)[:, 0], getattr(plain, metric)[:, plain.site("resid_post")]
            if metric.endswith(("rank", "_id")):
                np.testing.assert_array_equal(got, want)
            else:
                scale = np.log(tiny_model.d_vocab) + 1 if metric == "entropy" else 1.0  # tests/tolerances.py
                np.testing.assert_allclose(got, want, rtol=0, atol=atol * scale)
        assert through.lens["kind"] == lens.kind
    assert plain.lens == {"kind": "logit"}
    assert set(plain.to_dataframe()["lens"]) == {"logit"}


@pytest.mark.parametrize("kind", ["tuned", "jacobian"])
def test_a_learned_lens_reads_as_the_naive_computation(tiny_model, probes, kind):
    lens = _random_lens(tiny_model, kind)
    result = layer_trajectory(tiny_model, probes, sites=("resid_post",), lens=lens)
    logit = layer_trajectory(tiny_model, probes, sites=("resid_post",))
    tokens = tokenize_probes(tiny_model, probes)
    # batched vs one probe at a time, behind the same final norm (which bounds the logits' scale
    # whatever the translator): fp32 noise
    atol = probes_prob_atol(tiny_model, probes)
    for i in (0, 5, 9):
        pred = result.memorization.records[i].pred_id
        for layer in range(tiny_model.n_layers):
            rank, prob = _naive(tiny_model, tokens[i], lens, layer, pred)
            assert result.pred_rank[i, 0, layer] == rank
            assert result.pred_prob[i, 0, layer] == pytest.approx(prob, abs=atol)
    # not a no-op: the translators change the early layers, and the last layer is the model's output
    assert not np.allclose(result.pred_prob[:, 0, :-1], logit.pred_prob[:, 0, :-1])
    np.testing.assert_allclose(result.pred_prob[:, 0, -1], logit.pred_prob[:, 0, -1], atol=atol)


@pytest.mark.parametrize("kind", ["tuned", "jacobian"])
def test_saved_and_loaded_lenses_read_identically(tiny_model, probes, tmp_path, kind):
    lens = _random_lens(tiny_model, kind, seed=3)
    again = Lens.load(lens.save(tmp_path / f"{kind}.pt"))
    assert again.describe() == lens.describe()
    a = layer_trajectory(tiny_model, probes, sites=("resid_post",), lens=lens)
    b = layer_trajectory(tiny_model, probes, sites=("resid_post",), lens=again)
    for metric in METRICS:
        np.testing.assert_array_equal(getattr(a, metric), getattr(b, metric))


def test_a_lens_of_another_model_is_refused(tiny_model, tiny_llama_dir, probes):
    from idiom_lens.models.loading import load_model

    llama = load_model(str(tiny_llama_dir), progress=False)
    lens = _random_lens(tiny_model, "tuned")
    with pytest.raises(InputError, match="trained for .* not for"):
        layer_trajectory(llama, probes, sites=("resid_post",), lens=lens)
    fewer = dataclasses.replace(lens, n_layers=2, translators={k: v[:2] for k, v in lens.translators.items()})
    with pytest.raises(InputError, match=r"\(2 layers.*not for .*\(3 layers"):
        layer_trajectory(tiny_model, probes, sites=("resid_post",), lens=fewer)


def test_bad_lenses_and_sites_are_refused(tiny_model, probes, tmp_path):
    with pytest.raises(InputError, match="reads block outputs"):
        layer_trajectory(tiny_model, probes, sites=("attn_out",), lens=_random_lens(tiny_model, "tuned"))
    with pytest.raises(InputError, match="translator 'J' has shape"):
        Lens(kind="jacobian", model_name="m", n_layers=3, d_model=4, translators={"J": torch.zeros(2, 4, 4)})
    with pytest.raises(InputError, match="lens kind 'magic' is unknown"):
        Lens(kind="magic", model_name="m", n_layers=3, d_model=4)
    (tmp_path / "junk.pt").write_bytes(b"not a lens")
    with pytest.raises(InputError, match="not a lens file"):
        Lens.load(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="no lens file"):
        Lens.load(tmp_path / "missing.pt")

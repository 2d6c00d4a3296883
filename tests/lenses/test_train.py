"""Lens training: the hand-written gradient equals autograd's, training is seeded, resumes exactly,
learns (held-out KL below the logit lens's), and the Jacobian lens resumes by slice."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from tolerances import logit_atol, prob_atol, probes_prob_atol  # tests/tolerances.py: why each bound

from idiom_lens.errors import InputError
from idiom_lens.lenses.corpus import tokenize_sentences
from idiom_lens.lenses.lens import Lens, logit_lens
from idiom_lens.lenses.train import (
    _batch_rows,
    _kl_and_grad,
    collect_residuals,
    fit_jacobian_lens,
    heldout_kl,
    lens_logits,
    probe_kl,
    train_tuned_lens,
    training_curve,
)
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.vocab import mask_logits, valid_mask

SENTENCES = ["the cat sat on the mat", "she walked to the market", "he read a long book about history",
             "once in a blue moon", "the elephant in the room", "kill two birds with one stone",
             "a piece of cake for the cat", "break the ice at the market"]


@pytest.fixture(scope="module")
def residuals(tiny_model):
    return collect_residuals(tiny_model, tokenize_sentences(tiny_model, SENTENCES))


def test_residuals_are_the_plain_forward_s(tiny_model):
    seqs = tokenize_sentences(tiny_model, SENTENCES[:3])
    rows, owner = collect_residuals(tiny_model, seqs, batch_size=2)
    start = 0
    for i, seq in enumerate(seqs):
        _, cache = tiny_model.bridge.run_with_cache(torch.tensor([seq]))
        for layer in range(tiny_model.n_layers):  # batched and padded vs one forward: fp32 noise of layer + 1 blocks
            plain = cache[f"blocks.{layer}.hook_resid_post"][0, 1:]
            torch.testing.assert_close(rows[start : start + len(seq) - 1, layer], plain,
                                       atol=logit_atol(tiny_model, plain, n_layers=layer + 1), rtol=0)
        assert (owner[start : start + len(seq) - 1] == i).all()
        start += len(seq) - 1
    assert rows.shape[0] == start


def test_hand_written_kl_gradient_equals_autograd(tiny_model, residuals):
    h = residuals[0][:6]
    target = lens_logits(tiny_model, h[:, -1]).softmax(-1)
    normed = tiny_model.bridge.ln_final(h[:, 0].unsqueeze(0)).squeeze(0).detach()
    kl, grad = _kl_and_grad(tiny_model, normed, target, torch.xlogy(target, target).sum(-1),
                            tiny_model.bridge.W_U.detach(), {})
    x = normed.clone().requires_grad_(True)
    logits = (x @ tiny_model.bridge.W_U + tiny_model.bridge.b_U)
    from idiom_lens.models.vocab import mask_logits, valid_mask
    logq = mask_logits(logits, valid_mask(tiny_model)).log_softmax(-1)
    loss = (torch.xlogy(target, target) - target * logq).sum(-1).mean()  # KL(target || q), 0 log 0 = 0
    loss.backward()
    # the same formulas, in other orders: a KL moves by at most its log-probabilities' noise (one
    # unembedding); the gradient (1/N) W_U (q - t) by that noise x the largest row sum of |W_U|
    noise = prob_atol(tiny_model, logits, n_layers=1)
    assert kl == pytest.approx(float(loss.detach()), abs=noise)
    w_u = tiny_model.bridge.W_U.detach()
    torch.testing.assert_close(grad, x.grad, atol=noise * float(w_u.abs().sum(-1).max()) / len(h), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_is_seeded_and_learns(tiny_model, residuals, dtype):
    """The same test whichever precision `models.precision` picks on the machine at hand: a bf16
    lens must learn as well as an fp32 one, and both record what they used."""
    rows, owner = residuals
    kwargs = dict(steps=30, batch_tokens=16, lr=3e-3, progress=False, log=lambda s: None, matmul_dtype=dtype)
    a = train_tuned_lens(tiny_model, rows, seed=1, **kwargs)
    b = train_tuned_lens(tiny_model, rows, seed=1, **kwargs)
    c = train_tuned_lens(tiny_model, rows, seed=2, **kwargs)
    for name in ("weight", "bias"):
        assert torch.equal(a.translators[name], b.translators[name])
        assert not torch.equal(a.translators[name], c.translators[name])
        assert torch.count_nonzero(a.translators[name][-1]) == 0  # the last layer stays the identity
    assert a.settings["matmul_dtype"] == str(dtype).removeprefix("torch.")
    table = heldout_kl(tiny_model, [logit_lens(tiny_model), a], rows, owner)
    wide = table.pivot(index="layer", columns="lens", values="kl")
    last = tiny_model.n_layers - 1
    # the last layer's lens is the model's output, computed another way: a KL of at most the
    # log-probabilities' fp32 noise
    noise = prob_atol(tiny_model, lens_logits(tiny_model, rows[:, -1]), n_layers=1)
    assert wide.loc[last, "logit"] == pytest.approx(0, abs=noise)
    assert wide.loc[last, "tuned"] == pytest.approx(0, abs=noise)
    assert (wide.loc[: last - 1, "tuned"] < wide.loc[: last - 1, "logit"]).all()


def test_an_interrupted_training_resumes_to_the_same_lens(tiny_model_dir, tmp_path):
    """Killed (SIGKILL) right after its first checkpoint, a rerun gives the straight run's lens."""
    script = textwrap.dedent(f"""
        import sys, torch
        from idiom_lens.models.loading import load_model
        from idiom_lens.lenses.corpus import tokenize_sentences
        from idiom_lens.lenses.train import collect_residuals, train_tuned_lens
        model = load_model({str(tiny_model_dir)!r}, progress=False)
        rows, _ = collect_residuals(model, tokenize_sentences(model, {SENTENCES!r}))
        ckpt = sys.argv[1] if sys.argv[1] != "-" else None
        lens = train_tuned_lens(model, rows, steps=12, batch_tokens=8, seed=0,
                                checkpoint=ckpt and __import__("pathlib").Path(ckpt),
                                checkpoint_every=4, progress=False, matmul_dtype=torch.float32)
        lens.save(sys.argv[2])
    """)
    env = dict(os.environ)

    def run(ckpt, out, **extra):
        return subprocess.run([sys.executable, "-c", script, ckpt, str(out)],
                              env={**env, **extra}, capture_output=True, text=True)

    straight = run("-", tmp_path / "straight.pt")
    assert straight.returncode == 0, straight.stderr
    killed = run(str(tmp_path / "ckpt.pt"), tmp_path / "resumed.pt", IDIOM_LENS_FAULT="lens.checkpoint")
    assert killed.returncode == -9 and (tmp_path / "ckpt.pt").is_file() and not (tmp_path / "resumed.pt").exists()
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 4
    resumed = run(str(tmp_path / "ckpt.pt"), tmp_path / "resumed.pt")
    assert resumed.returncode == 0, resumed.stderr
    a, b = Lens.load(tmp_path / "straight.pt"), Lens.load(tmp_path / "resumed.pt")
    for name in ("weight", "bias"):
        assert torch.equal(a.translators[name], b.translators[name])
    # the curve too: the first 4 losses from the checkpoint, the rest computed again
    assert len(a.settings["training_curve"]["train_kl"]) == 12
    assert a.settings["training_curve"] == b.settings["training_curve"]


def test_jacobian_lens_is_transformer_lens_s_fit_and_resumes_by_slice(tiny_model, tmp_path, monkeypatch):
    from transformer_lens.tools.analysis import JacobianLens

    sentences = SENTENCES[:4]
    lens = fit_jacobian_lens(tiny_model, sentences, corpus="test", work_dir=tmp_path, slice_size=2,
                             progress=False, log=lambda s: None)
    direct = JacobianLens.fit(tiny_model.bridge, sentences, corpus="test", dim_batch=32, max_seq_len=48,
                              skip_first_positions=1, show_progress=False)
    for layer in range(tiny_model.n_layers - 1):  # averages over tokens in other slices: fp32 noise of J's scale
        J = direct.jacobians[layer]
        torch.testing.assert_close(lens.translators["J"][layer], J, atol=logit_atol(tiny_model, J), rtol=0)
    assert torch.equal(lens.translators["J"][-1], torch.eye(tiny_model.d_model))
    # a rerun with one slice missing fits only that slice
    slices = sorted(tmp_path.glob("slice-*.pt"))
    assert len(slices) == 2
    slices[1].unlink()
    calls = []
    real_fit = JacobianLens.fit.__func__
    monkeypatch.setattr(JacobianLens, "fit",
                        classmethod(lambda cls, *a, **k: calls.append(1) or real_fit(cls, *a, **k)))
    again = fit_jacobian_lens(tiny_model, sentences, corpus="test", work_dir=tmp_path, slice_size=2,
                              progress=False, log=lambda s: None)
    assert len(calls) == 1
    assert torch.equal(again.translators["J"], lens.translators["J"])  # the same computation again: the same bits


def test_training_gives_the_model_back_as_it_was(tiny_model, residuals):
    """The weights are frozen while a lens trains and unfrozen after: TransformerLens picks its
    norms' code path by requires_grad, so a model left frozen would round later analyses
    differently from a freshly loaded one (seen: Ray workers' skipping results off in the last bit)."""
    before = [p.requires_grad for p in tiny_model.bridge.parameters()]
    train_tuned_lens(tiny_model, residuals[0], steps=2, batch_tokens=8, progress=False, log=lambda s: None,
                     matmul_dtype=torch.float32)
    assert [p.requires_grad for p in tiny_model.bridge.parameters()] == before


def _mean_kl_below_last(model, lens, rows) -> float:
    """Mean of `heldout_kl` over every layer but the last (the trained ones), over all `rows`."""
    table = heldout_kl(model, [lens], rows, torch.zeros(len(rows), dtype=torch.long), n_boot=10)
    return float(table[table.layer < model.n_layers - 1].kl.mean())


def test_training_curve_is_recorded_and_checks_by_hand(tiny_model, residuals):
    rows, _ = residuals
    train, held = rows[: len(rows) // 2], rows[len(rows) // 2 :]
    lens = train_tuned_lens(tiny_model, train, steps=12, batch_tokens=8, lr=3e-3, seed=3, progress=False,
                            log=lambda s: None, matmul_dtype=torch.float32, heldout=held, heldout_every=5)
    curve = training_curve(lens)
    assert list(curve.columns) == ["step", "train_kl", "heldout_kl"]
    assert curve.step.tolist() == list(range(13)) and np.isnan(curve.train_kl.iloc[-1])
    assert curve.train_kl.iloc[:12].notna().all()
    assert curve.dropna(subset=["heldout_kl"]).step.tolist() == [0, 5, 10, 12]
    noise = prob_atol(tiny_model, lens_logits(tiny_model, rows[:, -1]), n_layers=1)
    # step 0: the logit lens's loss on step 0's batch and on the held-out rows, by `heldout_kl`
    batch = train[_batch_rows(len(train), 8, 0, 3)]
    assert curve.train_kl[0] == pytest.approx(_mean_kl_below_last(tiny_model, logit_lens(tiny_model), batch), abs=noise)
    assert curve.heldout_kl[0] == pytest.approx(_mean_kl_below_last(tiny_model, logit_lens(tiny_model), held),
                                                abs=noise)
    # the last row: the trained lens on the held-out rows; training lowered both curves
    assert curve.heldout_kl[12] == pytest.approx(_mean_kl_below_last(tiny_model, lens, held), abs=noise)
    assert curve.heldout_kl[12] < curve.heldout_kl[0]
    assert curve.train_kl.iloc[9:12].mean() < curve.train_kl.iloc[:3].mean()
    # without held-out rows: the training losses only
    plain = training_curve(train_tuned_lens(tiny_model, train, steps=3, batch_tokens=8, progress=False,
                                            log=lambda s: None, matmul_dtype=torch.float32))
    assert len(plain) == 4 and plain.heldout_kl.isna().all()
    with pytest.raises(InputError, match="heldout must be"):
        train_tuned_lens(tiny_model, train, steps=1, heldout=held[:, :2], progress=False, log=lambda s: None)


def test_a_lens_without_a_curve_has_an_empty_one(tiny_model, tmp_path):
    """Lenses cached before curves were recorded, and the logit and Jacobian lenses."""
    old = Lens(kind="tuned", model_name=tiny_model.name, n_layers=tiny_model.n_layers, d_model=tiny_model.d_model,
               translators={"weight": torch.zeros(tiny_model.n_layers, tiny_model.d_model, tiny_model.d_model),
                            "bias": torch.zeros(tiny_model.n_layers, tiny_model.d_model)},
               settings={"steps": 120})
    old.save(tmp_path / "old.pt")
    for lens in (Lens.load(tmp_path / "old.pt"), logit_lens(tiny_model)):
        curve = training_curve(lens)
        assert curve.empty and list(curve.columns) == ["step", "train_kl", "heldout_kl"]


def test_probe_kl_is_the_kl_at_the_last_prompt_token(tiny_model, probes, residuals):
    """By hand per probe: a plain forward with a cache; the final distribution (masked) against the
    logit lens's read-out of each layer at the last prompt token, and a trained lens beside it."""
    lens = train_tuned_lens(tiny_model, residuals[0], steps=4, batch_tokens=8, progress=False, log=lambda s: None,
                            matmul_dtype=torch.float32)
    table = probe_kl(tiny_model, lens, probes, batch_size=3, n_boot=200)
    assert list(table.columns) == ["lens", "layer", "kl", "kl_low", "kl_high", "n_probes"]
    assert table.lens.tolist() == ["logit"] * tiny_model.n_layers + ["tuned"] * tiny_model.n_layers
    assert (table.n_probes == len(probes)).all()
    mask = valid_mask(tiny_model)
    by_hand = np.zeros((len(probes), tiny_model.n_layers))
    for i, toks in enumerate(tokenize_probes(tiny_model, probes)):
        with torch.no_grad():
            logits, cache = tiny_model.bridge.run_with_cache(torch.tensor([toks.prompt_ids]))
            logp = mask_logits(logits[0, -1], mask).double().log_softmax(-1)
            for layer in range(tiny_model.n_layers):
                h = cache[f"blocks.{layer}.hook_resid_post"][0, -1]
                x = tiny_model.bridge.ln_final(h[None, None])[0, 0]
                logq = mask_logits(x @ tiny_model.bridge.W_U + tiny_model.bridge.b_U, mask).double().log_softmax(-1)
                p = logp.exp()
                by_hand[i, layer] = float((p * (logp - logq)).nan_to_num().sum())  # 0 log 0 = 0 off the vocabulary
    logit = table[table.lens == "logit"].set_index("layer")
    noise = 2 * probes_prob_atol(tiny_model, probes)  # a KL sums p x a log-probability difference
    np.testing.assert_allclose(logit.kl.to_numpy(), by_hand.mean(0), atol=noise, rtol=1e-4)
    assert logit.kl.iloc[-1] == pytest.approx(0, abs=noise)  # the last layer is the model's own output
    assert (logit.kl_low <= logit.kl + noise).all() and (logit.kl <= logit.kl_high + noise).all()
    assert (logit.kl_low < logit.kl_high).iloc[:-1].all()
    # the logit lens alone once; no probe refused
    assert probe_kl(tiny_model, logit_lens(tiny_model), probes[:2], n_boot=10).lens.unique().tolist() == ["logit"]
    with pytest.raises(InputError, match="at least one probe"):
        probe_kl(tiny_model, lens, [])

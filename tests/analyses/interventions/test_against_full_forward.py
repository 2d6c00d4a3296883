"""Every intervention fast path against the slow, obvious computation.

The fast paths (a prefix key/value cache reused across configurations, configurations as rows of
one batch, hooks on a slice of positions, the unembedding of the last position only) are
compared here with one plain `run_with_hooks` per probe and configuration on the whole prompt,
hooks written out by hand. Run on the tiny random Gemma 3 and Llama and on the embedded model,
under whatever package versions are installed: a version that breaks a shortcut fails here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tolerances import forward_rtol, logit_atol, prob_atol  # tests/tolerances.py: why each bound

from idiom_lens.analyses.interventions import (
    KnockoutGrid,
    KnockoutOptions,
    SkipOptions,
    knockout_grid,
    patch_pair,
    rank_neurons,
    skip_layers,
)
from idiom_lens.analyses.interventions.knockouts import (
    CONTROLS,
    matched_neurons,
    random_neurons,
    score_matched_neurons,
)
from idiom_lens.analyses.interventions.patching import site_activations
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import FastPathError, InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.runners import PromptRunner, SuffixRunner
from idiom_lens.models.selfcheck import plain_last_logits, relative_error
from idiom_lens.models.vocab import valid_mask

EMBEDDED_PROBES = [
    Probe(id="blue", prompt="once in a blue", target="moon", kind="idiom"),
    Probe(id="eye", prompt="turn a blind", target="eye", kind="idiom"),
    Probe(id="stone", prompt="kill two birds with one", target="stone", kind="idiom"),
    Probe(id="mat", prompt="the cat sat on the", target="mat", kind="text"),
]


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from idiom_lens.models.loading import load_model

    return load_model(str(tiny_llama_dir), mode="raw", progress=False)


TINY_MODELS = ("tiny_model", "tiny_gemma_post", "tiny_llama")


@pytest.fixture(params=[*TINY_MODELS, pytest.param("embedded_model", marks=pytest.mark.embedded)])
def case(request, probes):
    """(model, probes): the tiny models on the tiny probes, the embedded model on real idioms."""
    model = request.getfixturevalue(request.param)
    return model, (EMBEDDED_PROBES if request.param == "embedded_model" else list(probes[:4]))


def options(names: str, values: list[tuple], *, embedded: tuple):
    """Parametrize `case` and the options `names`: every combination of `values` on each tiny
    model, and the one combination `embedded` on the embedded model. The tiny models (Gemma 3 with
    and without post norms, Llama) cover every code path in seconds; the embedded model adds real
    shapes (18 layers, 262k vocabulary), which one combination shows as well as all of them."""
    rows = [(model, *combo) for model in TINY_MODELS for combo in values]
    rows.append(pytest.param("embedded_model", *embedded, marks=pytest.mark.embedded))
    return pytest.mark.parametrize(f"case, {names}", rows, indirect=["case"])


def checked_layers(model) -> set[int]:
    """Every layer of a tiny model; on the 18-layer embedded model the first two, a middle one and
    the last two (each one more hand-written full forward over a 262k vocabulary)."""
    n = model.n_layers
    return set(range(n)) if n <= 4 else {0, 1, n // 2, n - 2, n - 1}


def full_forward(model, ids, hooks=()) -> torch.Tensor:
    """The obvious computation: one probe, one configuration, the whole prompt, all positions unembedded."""
    with torch.no_grad():
        return model.bridge.run_with_hooks(torch.tensor([list(ids)]), fwd_hooks=list(hooks))[0, -1].float()


def masked(model, logits: torch.Tensor) -> torch.Tensor:
    """Logits with special and unused tokens out of reach, written out by hand (not `vocab.mask_logits`)."""
    valid = valid_mask(model)
    return torch.where(valid, logits, torch.full_like(logits, torch.finfo(logits.dtype).min))


def prediction(model, logits: torch.Tensor) -> int:
    return int(masked(model, logits).argmax())


def zero_neurons(neurons: torch.Tensor | None, positions: str, last: int, fill: torch.Tensor | None = None):
    """A hook zeroing `neurons` (all when None) of `mlp.hook_post` at the last or every position, or
    setting them to their values in `fill` ([d_mlp], a mean ablation's means)."""

    def hook(x, hook):
        x = x.clone()
        pos = slice(last, last + 1) if positions == "last" else slice(None)
        which = slice(None) if neurons is None else neurons
        x[:, pos, which] = 0 if fill is None else fill[which].to(x.dtype)
        return x

    return hook


def plain_activations(model, prompt_ids) -> dict[int, torch.Tensor]:
    """`mlp.hook_post` at the last position of every layer, from a plain `run_with_cache`."""
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.tensor([list(prompt_ids)]))
    return {l: cache[f"blocks.{l}.mlp.hook_post"][0, -1].float() for l in range(model.n_layers)}


def has_post_norm(model) -> bool:
    return all(hasattr(b, "ln2_post") for b in model.bridge.blocks)


def clean_post_norm(model, prompt_ids) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, Gemma's post-MLP RMSNorm written out: (gain 1 + w, clean RMS of the MLP output at
    every position, sqrt(mean(m^2) + eps)), from a plain `run_with_cache`."""
    with torch.no_grad():
        _, cache = model.bridge.run_with_cache(torch.tensor([list(prompt_ids)]))
    out = {}
    for l, block in enumerate(model.bridge.blocks):
        m = cache[f"blocks.{l}.ln2_post.hook_in"][0].float()
        eps = block.ln2_post.original_component.eps
        out[l] = (1.0 + block.ln2_post.weight.detach().float(), (m.pow(2).mean(-1) + eps).sqrt())
    return out


def scores_by_hand(model, prompt_ids, rank_by: str, acts=None, post=None) -> dict[int, torch.Tensor]:
    """Per layer, the ranking score at the last position: |a| x ||W_out row|| (magnitude), or
    |a| x ||W_out row x (1 + w)|| / s_clean (effective, with Gemma's post-MLP norm written out)."""
    acts = plain_activations(model, prompt_ids) if acts is None else acts
    w_out = model.bridge.W_out.detach().float()
    if has_post_norm(model) and rank_by == "effective":
        post = clean_post_norm(model, prompt_ids) if post is None else post
    else:
        post = None
    out = {}
    for l in range(model.n_layers):
        if post is None:
            out[l] = acts[l].abs() * w_out[l].norm(dim=-1)
        else:
            gain, s = post[l]
            out[l] = acts[l].abs() * (w_out[l] * gain).norm(dim=-1) / s[-1]
    return out


def frozen_norm_hooks(layer: int, gain: torch.Tensor, s_clean: torch.Tensor, positions: str, last: int):
    """Gemma's post-MLP norm with its scale frozen at the clean value, by hand: output = input x (1 + w) / s."""
    store = {}

    def keep(x, hook):
        store["x"] = x.clone()

    def put(y, hook):
        y = y.clone()
        pos = slice(last, last + 1) if positions == "last" else slice(None)
        y[:, pos] = store["x"][:, pos] * gain / s_clean[pos][None, :, None]
        return y

    return [(f"blocks.{layer}.ln2_post.hook_in", keep), (f"blocks.{layer}.ln2_post.hook_out", put)]


def contributions_by_hand(model, acts, post, layer: int, means=None) -> torch.Tensor:
    """[d_mlp, d_model]: what knocking out each neuron of `layer` removes from the layer's output at
    the last position, (a_i - fill_i) x W_out[i] x (1 + w) / s_clean (Gemma's post-MLP norm written
    out; W_out[i] alone without one), fill 0 (zero ablation) or the neuron's mean (`means`)."""
    w_out = model.bridge.blocks[layer].mlp.out.original_component.weight.detach().float().T  # [d_mlp, d_model]
    coef = acts[layer] - (0.0 if means is None else means[layer])
    if post is None:
        return coef[:, None] * w_out
    gain, s = post[layer]
    return coef[:, None] * w_out * gain / s[-1]


def reference_state(model, prompt_ids) -> dict:
    """What the slow reference needs of a probe's clean pass, from plain `run_with_cache` calls."""
    acts = plain_activations(model, prompt_ids)
    post = clean_post_norm(model, prompt_ids) if has_post_norm(model) else None
    return {"acts": acts, "post": post,
            "scores": {r: scores_by_hand(model, prompt_ids, r, acts, post) for r in ("effective", "magnitude")}}


def reference_knockout_logits(model, prompt_ids, row, *, positions: str, seed: int = 0, ref=None,
                              means=None) -> torch.Tensor:
    """The logits a knockout row (mode, control, k, start, end, rank_by, norm, ablation) must have,
    computed the slow way: neurons ranked from a plain `run_with_cache` by hand (targeted), drawn by
    `random_neurons` / `matched_neurons` (on contributions written out by hand) /
    `score_matched_neurons` (their own tests check them), or all (whole_mlp); zeroed (or set to
    `means`, a mean-ablation row) by hand in one full forward, with the post-MLP norm frozen by hand
    when row.norm is frozen. `ref` = `reference_state(model, prompt_ids)` (computed here when not given)."""
    d_mlp = int(model.bridge.cfg.d_mlp)
    ref = reference_state(model, prompt_ids) if ref is None else ref
    scores = ref["scores"][getattr(row, "rank_by", "magnitude")]
    effective, post = ref["scores"]["effective"], ref["post"]
    assert (getattr(row, "ablation", "zero") == "mean") == (means is not None), "mean-ablation rows need means"
    last = len(prompt_ids) - 1
    hooks = []
    for layer in range(row.start, row.end + 1):
        k = min(row.k, d_mlp)
        top = scores[layer].argsort(descending=True, stable=True)[:k]
        if row.control == "targeted":
            chosen = top
        elif row.control == "random":
            chosen = random_neurons(probe_id=row.probe_id, layer=layer, k=k, d_mlp=d_mlp, seed=seed)
        elif row.control == "matched":
            chosen = matched_neurons(contributions_by_hand(model, ref["acts"], post, layer, means), top,
                                     probe_id=row.probe_id, layer=layer, k=k, seed=seed)
        elif row.control == "matched_score":
            chosen = score_matched_neurons(effective[layer], top, probe_id=row.probe_id, layer=layer, k=k, seed=seed)
        else:
            chosen = torch.arange(d_mlp)
        if row.mode == "keep_top" and row.control != "whole_mlp":
            keep = torch.zeros(d_mlp, dtype=torch.bool)
            keep[chosen] = True
            chosen = (~keep).nonzero().flatten()
        if len(chosen) == 0:
            continue
        fill = None if means is None else means[layer]
        hooks.append((f"blocks.{layer}.mlp.hook_post", zero_neurons(chosen, positions, last, fill)))
        if getattr(row, "norm", "live") == "frozen" and post is not None:
            hooks += frozen_norm_hooks(layer, *post[layer], positions, last)
    return full_forward(model, prompt_ids, hooks)


def assert_row_matches(row, logits: torch.Tensor, clean_pred: int, model) -> None:
    """The row's outcome equals these full-forward logits, masked by hand over real tokens."""
    atol = prob_atol(model, logits)  # fp32: another batch shape, cache and kernels than the plain forward
    tie = logit_atol(model, logits)
    logits = masked(model, logits)
    probs = logits.softmax(-1)
    best = int(logits.argmax())
    assert row.new_pred_id == best or float(logits[best] - logits[row.new_pred_id]) <= tie  # or a near tie
    assert row.prob_of_clean_pred == pytest.approx(float(probs[clean_pred]), abs=atol)
    assert row.target_prob == pytest.approx(float(probs[row.target_id]), abs=atol)


def n_checked_probes(model) -> int:
    """Probes per knockout test: two on a tiny model, one on the embedded model (each row is one
    more hand-written full forward over a 262k vocabulary)."""
    return 2 if model.n_layers <= 4 else 1


def with_targets(result):
    return result.to_dataframe().merge(result.probes[["probe_id", "target_id"]], on="probe_id")


@options("positions", [("last",), ("all",)], embedded=("all",))
def test_knockout_of_nothing_is_the_full_forward(case, positions):
    model, probes = case
    probes = probes if model.n_layers <= 4 else probes[:2]
    d_mlp = int(model.bridge.cfg.d_mlp)
    grid = KnockoutGrid(ks=(0, d_mlp), windows=(1,), modes=("zero_top", "keep_top"), keep_top_ks=None,
                        keep_top_windows=None)
    result = knockout_grid(model, probes, KnockoutOptions(grid=grid, controls=(), positions=positions))
    rows = with_targets(result)
    noop = rows[((rows["mode"] == "zero_top") & (rows["k"] == 0))
                | ((rows["mode"] == "keep_top") & (rows["k"] == d_mlp))]
    assert len(noop) == 2 * model.n_layers * len(probes)
    for probe, toks in zip(probes, tokenize_probes(model, probes)):
        plain = full_forward(model, toks.prompt_ids)
        clean = result.probes.set_index("probe_id").loc[probe.id]
        assert clean.clean_pred_id == prediction(model, plain)
        assert clean.clean_pred_prob == pytest.approx(float(masked(model, plain).softmax(-1).max()),
                                                      abs=prob_atol(model, plain))
        for row in noop[noop["probe_id"] == probe.id].itertuples():
            assert_row_matches(row, plain, prediction(model, plain), model)
            assert not row.changed


@options("positions, window", [(p, w) for p in ("last", "all") for w in (1, 2)], embedded=("all", 2))
def test_whole_mlp_knockout_is_the_full_forward_with_hook_post_zeroed(case, positions, window):
    """The whole-MLP ceiling (and k = d_mlp) zeroes whole MLP layers: `mlp.hook_post` zeroed by hand."""
    model, probes = case
    probes = probes[: n_checked_probes(model)]
    d_mlp = int(model.bridge.cfg.d_mlp)
    grid = KnockoutGrid(ks=(d_mlp,), windows=(window,), modes=("zero_top",))
    result = knockout_grid(model, probes, KnockoutOptions(grid=grid, controls=("whole_mlp",), positions=positions))
    rows = with_targets(result)
    assert set(rows["control"]) == {"targeted", "whole_mlp"} and set(rows["k"]) == {d_mlp}
    assert (rows["zeroed_share"] == 1.0).all() and (rows["n_zeroed"] == window * d_mlp).all()
    for probe, toks in zip(probes, tokenize_probes(model, probes)):
        clean_pred = prediction(model, full_forward(model, toks.prompt_ids))
        last = len(toks.prompt_ids) - 1
        for row in rows[(rows["probe_id"] == probe.id) & rows["start"].isin(checked_layers(model))].itertuples():
            hooks = [(f"blocks.{l}.mlp.hook_post", zero_neurons(None, positions, last))
                     for l in range(row.start, row.end + 1)]
            assert_row_matches(row, full_forward(model, toks.prompt_ids, hooks), clean_pred, model)
    assert rows["changed"].any() or rows["prob_drop"].abs().max() > 1e-3  # the knockouts do something


@options("positions, norm", [(p, n) for p in ("last", "all") for n in ("live", "frozen")], embedded=("all", "frozen"))
def test_top_k_and_every_control_are_full_forwards(case, positions, norm):
    """Targeted top-k (effective ranking, by hand from a plain cache), the random, matched and
    score-matched controls and the whole-MLP ceiling, zero_top and keep_top, windows of 1 and 2 layers, the post-MLP
    norm live or frozen (by hand): each row equals one full forward with those neurons zeroed by hand."""
    model, probes = case
    probes = probes[: n_checked_probes(model)]
    grid = KnockoutGrid(ks=(5,), windows=(1, 2), modes=("zero_top", "keep_top"), keep_top_ks=None,
                        keep_top_windows=None)
    result = knockout_grid(model, probes, KnockoutOptions(grid=grid, positions=positions, norm=norm, seed=3,
                                                          controls=CONTROLS))
    rows = with_targets(result)
    assert set(rows["control"]) == {"targeted", "random", "matched", "matched_score", "whole_mlp"}
    assert set(rows.loc[rows["mode"] == "keep_top", "control"]) == {"targeted", "random"}
    assert (rows["norm"] == norm).all() and (rows["positions"] == positions).all()
    for probe, toks in zip(probes, tokenize_probes(model, probes)):
        clean_pred = prediction(model, full_forward(model, toks.prompt_ids))
        ref = reference_state(model, toks.prompt_ids)
        for row in rows[(rows["probe_id"] == probe.id) & rows["start"].isin(checked_layers(model))].itertuples():
            expected = reference_knockout_logits(model, toks.prompt_ids, row, positions=positions, seed=3, ref=ref)
            assert_row_matches(row, expected, clean_pred, model)


def test_frozen_norm_differs_from_live_only_with_a_post_norm(case):
    """Frozen and live agree where there is no post-MLP norm (Llama) and differ where there is."""
    model, probes = case
    kw = dict(grid=KnockoutGrid(ks=(5,), windows=(1,), modes=("zero_top",)), controls=(), positions="all")
    live = knockout_grid(model, probes[:1], KnockoutOptions(norm="live", **kw)).rows
    frozen = knockout_grid(model, probes[:1], KnockoutOptions(norm="frozen", **kw)).rows
    gap = np.abs(live["prob_of_clean_pred"].to_numpy() - frozen["prob_of_clean_pred"].to_numpy()).max()
    noise = prob_atol(model, 30.0)  # fp32 noise of probabilities from logits up to 30 (Gemma's largest)
    if has_post_norm(model):
        assert gap > noise
    else:  # the same computation twice: identical
        assert gap == 0.0


@options("rank_by", [("effective",), ("magnitude",)], embedded=("effective",))
def test_neuron_ranking_is_a_plain_cache(case, rank_by):
    """Scores equal |a| x ||W_out row|| (magnitude) or |a| x ||W_out row x (1 + w)|| / s_clean
    (effective: Gemma's post-MLP RMSNorm written out), from a plain cache."""
    model, probes = case
    ranking = rank_neurons(model, probes[:2], rank_by=rank_by)
    for p, toks in enumerate(tokenize_probes(model, probes[:2])):
        with torch.no_grad():
            logits, cache = model.bridge.run_with_cache(torch.tensor([toks.prompt_ids]))
        assert ranking.pred_ids[p] == prediction(model, logits[0, -1])
        expected = scores_by_hand(model, toks.prompt_ids, rank_by)
        for layer in range(model.n_layers):
            act = cache[f"blocks.{layer}.mlp.hook_post"][0, -1].float()
            # the ranking reads a prefix-cached run, the reference a full forward: fp32 noise of a
            # forward through layer + 1 blocks, relative to the values' scale (scores: |a| x a norm)
            depth = layer + 1
            torch.testing.assert_close(ranking.activations[p, layer], act,
                                       atol=logit_atol(model, act, n_layers=depth), rtol=0)
            torch.testing.assert_close(ranking.scores[p, layer], expected[layer],
                                       atol=logit_atol(model, expected[layer], n_layers=depth), rtol=0)


@options("positions", [("last",), ("all",)], embedded=("all",))
def test_layer_skip_is_the_full_forward_with_the_block_bypassed(case, positions):
    model, probes = case
    spans = [(), (0,), (1,), (0, 1), (model.n_layers - 1,)]
    result = skip_layers(model, probes[:3], SkipOptions(spans=spans, positions=positions))
    rows = result.to_dataframe().merge(result.probes[["probe_id", "target_id"]], on="probe_id")
    for probe, toks in zip(probes[:3], tokenize_probes(model, probes[:3])):
        clean_pred = prediction(model, full_forward(model, toks.prompt_ids))
        last = len(toks.prompt_ids) - 1
        for row, span in zip(rows[rows["probe_id"] == probe.id].itertuples(), spans):
            store = {}

            def keep(x, hook):
                store["x"] = x.clone()  # noqa: B023 (called within this iteration)

            def put(x, hook):
                x = x.clone()
                pos = slice(last, last + 1) if positions == "last" else slice(None)  # noqa: B023 (called within this iteration)
                x[:, pos] = store["x"][:, pos]  # noqa: B023 (called within this iteration)
                return x

            hooks = ([(f"blocks.{span[0]}.hook_resid_pre", keep), (f"blocks.{span[-1]}.hook_resid_post", put)]
                     if span else [])
            assert_row_matches(row, full_forward(model, toks.prompt_ids, hooks), clean_pred, model)
    assert rows.loc[rows["window"] > 0, "prob_drop"].abs().max() > 1e-3  # skipping does something


def test_patch_pair_cells_are_single_full_forwards(case):
    """Each (site, layer, position) of `patch_pair` equals one hand-written patched forward."""
    model, probes = case
    toks = tokenize_probes(model, probes[:1])[0]
    clean = list(toks.prompt_ids)
    corrupted = clean[:1] + [clean[-1]] + clean[2:]
    result = patch_pair(model, clean_ids=clean, corrupted_ids=corrupted, target_id=toks.target_id, batch_size=7)
    source, _ = site_activations(model, clean, result.sites)
    hook_of = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}
    n = model.n_layers  # every layer of a tiny model; the first, a middle and the last of the embedded one
    layers = range(n) if n <= 4 else (0, n // 2, n - 1)
    for s, site in enumerate(result.sites):
        for layer in layers:
            for pos in sorted({0, 1, len(clean) - 1}):  # BOS, the swapped token, the last token
                def put(x, hook, value=source[(site, layer)][pos], pos=pos):
                    x = x.clone()
                    x[:, pos] = value
                    return x

                expected = full_forward(model, corrupted, [(f"blocks.{layer}.{hook_of[site]}", put)])
                assert float(result.patched[s, layer, pos]) == pytest.approx(float(expected[toks.target_id]),
                                                                             abs=logit_atol(model, expected))


def test_runner_rows_are_full_forwards_with_and_without_the_prefix_cache(case):
    model, probes = case
    for toks in tokenize_probes(model, probes):
        plain = plain_last_logits(model, toks.prompt_ids)
        for use_kv in (True, False):
            rows = PromptRunner(model, toks.prompt_ids, use_kv=use_kv).run(3, [])
            for row in rows:  # fp32: a batch of rows, maybe a prefix cache, vs one plain forward
                assert relative_error(row, plain) < forward_rtol(model)


def test_suffix_runner_resumed_at_any_layer_is_the_full_forward(case):
    """Rows resumed at a layer from the clean residual stream equal a plain full forward, unhooked,
    and with a hook (whole MLP of the resume layer zeroed at every position) equal to that hook in a
    plain `run_with_hooks`; the clean pass's logits are the plain ones."""
    model, probes = case
    for toks in tokenize_probes(model, probes[:2]):
        plain = plain_last_logits(model, toks.prompt_ids)
        runner = SuffixRunner(model, toks.prompt_ids)
        rtol = forward_rtol(model)  # fp32: resumed rows of a batch vs one plain forward
        assert relative_error(runner.clean_logits, plain) < rtol
        for start in sorted(checked_layers(model)):
            for row in runner.run(2, [], start=start):
                assert relative_error(row, plain) < rtol
            hook = (f"blocks.{start}.mlp.hook_post", zero_neurons(None, "all", 0))
            by_hand = full_forward(model, toks.prompt_ids, [hook])
            assert relative_error(runner.run(1, [hook], start=start)[0], by_hand) < rtol
            assert relative_error(by_hand, plain) > 10 * rtol
            # the final-norm outputs of several runs, unembedded together, are each run's logits
            reads = torch.cat([runner.run(2, [], start=start, unembed=False),
                               runner.run(1, [hook], start=start, unembed=False)])
            assert reads.shape == (3, model.d_model)
            together = runner.logits(reads, chunk=2)
            assert relative_error(together[0], plain) < rtol and relative_error(together[2], by_hand) < rtol


def test_suffix_runner_from_a_position_with_recorded_keys_is_the_full_forward(case):
    """Rows running only the positions from p on, the earlier positions' keys and values recorded
    in a first run (`KVRecorder` -> `PrefixKV`), equal a plain full forward, unhooked and with the
    MLP of the resume layer zeroed at position p (hook index 0 in the suffix run); without the
    recorded keys a suffix run is refused."""
    from idiom_lens.models.runners import KVRecorder, PrefixKV

    model, probes = case
    toks = next(t for t in tokenize_probes(model, probes) if len(t.prompt_ids) >= 4)
    plain = plain_last_logits(model, toks.prompt_ids)
    runner = SuffixRunner(model, toks.prompt_ids)
    recorded = KVRecorder()
    runner.run(1, [], start=0, past=recorded)
    rtol = forward_rtol(model)
    n = len(toks.prompt_ids)
    for start in sorted(checked_layers(model)):
        for pos in (1, n - 2, n - 1):
            later = range(start, model.n_layers)
            past = PrefixKV({l: recorded.keys[l][:, :, :pos].repeat(2, 1, 1, 1) for l in later},
                            {l: recorded.values[l][:, :, :pos].repeat(2, 1, 1, 1) for l in later})
            for row in runner.run(2, [], start=start, from_pos=pos, past=past):
                assert relative_error(row, plain) < rtol

            def zero_at(x, hook, index=0):
                x = x.clone()
                x[:, index] = 0
                return x

            by_hand = full_forward(model, toks.prompt_ids, [(f"blocks.{start}.hook_mlp_out",
                                                            lambda x, hook, p=pos: zero_at(x, hook, p))])
            past_one = PrefixKV({l: v[:1] for l, v in past.keys.items()}, {l: v[:1] for l, v in past.values.items()})
            row = runner.run(1, [(f"blocks.{start}.hook_mlp_out", zero_at)], start=start, from_pos=pos, past=past_one)
            assert relative_error(row[0], by_hand) < rtol
    with pytest.raises(InputError, match="needs the earlier positions' keys and values"):
        runner.run(1, [], start=0, from_pos=1)


def test_self_check_stops_a_wrong_fast_path_and_nothing_is_written(tiny_model, tiny_model_dir, probes, tmp_path,
                                                                   monkeypatch, capsys):
    """A runner whose logits are off (as under transformers 5.24, where the prefix cache was
    ignored) must stop every sweep with FastPathError and the CLI must write no file."""
    from idiom_lens import cli

    real_run = PromptRunner.run
    monkeypatch.setattr(PromptRunner, "run", lambda self, n, hooks: real_run(self, n, hooks) + 0.5)
    real_suffix = SuffixRunner.run
    monkeypatch.setattr(SuffixRunner, "run",
                        lambda self, n, hooks, start=0: real_suffix(self, n, hooks, start=start) + 0.5)
    for sweep in (
        lambda: knockout_grid(tiny_model, probes[:2], KnockoutOptions(grid=KnockoutGrid(ks=(1,), windows=(1,)))),
        lambda: knockout_grid(tiny_model, probes[:2],
                              KnockoutOptions(grid=KnockoutGrid(ks=(1,), windows=(1,)), positions="last")),
        lambda: knockout_grid(tiny_model, probes[:2], KnockoutOptions(grid=KnockoutGrid(ks=(1,), windows=(1,)),
                                                                      positions="all", norm="frozen")),
        lambda: skip_layers(tiny_model, probes[:2], SkipOptions(windows=(1,))),
        lambda: rank_neurons(tiny_model, probes[:2]),
    ):
        with pytest.raises(FastPathError, match="transformers"):
            sweep()
    out = tmp_path / "knock"
    code = cli.main(["knockout", "--model", str(tiny_model_dir), "--dataset", "idioms", "--sample", "2", "--k", "1",
                     "--windows", "1", "--no-png", "--out", str(out)])
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "self-check failed" in err[0] and "transformers" in err[0], err
    assert not out.exists() or not any(p.is_file() for p in out.rglob("*"))


def test_self_check_stops_a_wrong_batched_forward(tiny_model, probes, monkeypatch):
    """The batched, padded forward of the trajectory and attribution is checked the same way."""
    from idiom_lens.analyses.trajectory import layer_trajectory

    real = tiny_model.bridge.run_with_hooks
    monkeypatch.setattr(tiny_model.bridge, "run_with_hooks", lambda *a, **kw: real(*a, **kw) * 1.01)
    with pytest.raises(FastPathError, match="batched"):
        layer_trajectory(tiny_model, probes, sites=["resid_post"])


def test_one_token_logit_equals_the_full_unembedding_and_a_wrong_one_stops_patching(case, monkeypatch):
    """`SuffixRunner.token_logits` (one column of W_U) equals the full logits' column; patching
    reads only that logit, so its run-time check must stop a wrong one before any pair is patched."""
    from idiom_lens.analyses.interventions.patching import PatchingOptions, patch_probes

    model, probes = case
    toks = tokenize_probes(model, probes[:1])[0]
    runner = SuffixRunner(model, toks.prompt_ids, suffix_ids=toks.suffix_ids)
    for start in (0, model.n_layers - 1):
        read = runner.run(3, [], start=start, unembed=False)
        full = runner.logits(read)
        for token in (toks.target_id, int(full[0].argmax())):
            assert relative_error(runner.token_logits(read, token), full[:, token]) < forward_rtol(model)
    real = SuffixRunner.token_logits
    monkeypatch.setattr(SuffixRunner, "token_logits", lambda self, read, token_id: real(self, read, token_id) + 0.5)
    with pytest.raises(FastPathError, match="one token's logit"):
        patch_probes(model, probes[:3], PatchingOptions())

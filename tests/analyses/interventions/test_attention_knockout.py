"""Attention knockout against blocking done independently on the Hugging Face model.

The reference (`hf_blocked_logits`) shares no code with `attention_knockout`: it loads the model
directory with transformers (eager attention, no TransformerLens), and for one configuration at a
time puts a forward pre-hook on the attention module of every layer in the window that replaces
its `attention_mask` argument by a copy with -inf at [query = last, key in the source positions];
the whole prompt runs, and the last position's logits are read. Our fast path (bridge hook on
`hook_attn_scores`, prefix key/value cache, configurations as batch rows) must agree with it on
the tiny Gemma 3 and the tiny Llama, and must differ from the clean run (a no-op edit fails).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from reference import load_hf_model  # tests/reference.py (tests/ is on the path: tests/conftest.py)
from tolerances import logit_atol, prob_atol, probes_prob_atol  # tests/tolerances.py: why each bound

from idiom_lens.analyses.interventions import AttentionKnockoutOptions
from idiom_lens.analyses.interventions import attention_knockouts as ak
from idiom_lens.analyses.interventions.attention_knockouts import (
    AttentionKnockoutResult,
    Block,
    attention_knockout,
    knockout_logits,
    layer_windows,
    source_positions,
)
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import FastPathError, InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.runners import PromptRunner
from idiom_lens.models.vocab import valid_mask

# Every comparison with the HF reference below: fp32 noise of a batched TransformerLens forward
# (maybe prefix-cached) against one plain HF forward, bounded by `tolerances`.
ALL_SOURCES = ("context", "last_word", "bos")

# Words the tiny tokenizer never saw split into several tokens: a non-empty last_word source.
EXTRA_PROBES = [
    Probe(id="split", prompt="once in a zyxblue", target="moon", kind="idiom"),
    Probe(id="one-word", prompt="break", target="ice", kind="idiom"),
]
# 20 tokens: longer than the tiny Gemma 3's sliding window (16), whose cached layers keep fewer keys.
LONG_PROBE = Probe(id="long", prompt="every cloud has a silver", target="lining", kind="idiom")


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    from idiom_lens.models.loading import load_model

    return load_model(str(tiny_llama_dir), mode="raw", progress=False)


@pytest.fixture(scope="module", params=["gemma3", "llama"])
def case(request, tiny_model_dir, tiny_llama_dir):
    """(our model, the independent HF model of the same directory)."""
    if request.param == "gemma3":
        return request.getfixturevalue("tiny_model"), load_hf_model(str(tiny_model_dir))
    return request.getfixturevalue("tiny_llama"), load_hf_model(str(tiny_llama_dir))


def chosen_probes(probes) -> list[Probe]:
    return [LONG_PROBE, *probes[:4], probes[6], probes[8], *EXTRA_PROBES]  # the first is self-checked


def hf_blocked_logits(hf_model, prompt_ids, layers, positions) -> torch.Tensor:
    """One configuration the slow, obvious way on the HF model: the attention mask of each layer in
    `layers` edited so the last query cannot see `positions`; the whole prompt runs."""
    n = len(prompt_ids)

    def edit(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        if mask is None:  # causal mask written out
            mask = torch.triu(torch.full((n, n), float("-inf")), diagonal=1)[None, None]
        mask = mask.clone()
        mask[..., n - 1, list(positions)] = float("-inf")
        kwargs["attention_mask"] = mask
        return args, kwargs

    handles = [hf_model.model.layers[l].self_attn.register_forward_pre_hook(edit, with_kwargs=True)
               for l in layers] if positions else []
    try:
        with torch.no_grad():
            return hf_model(torch.tensor([list(prompt_ids)])).logits[0, -1].float()
    finally:
        for h in handles:
            h.remove()


def masked_probs(model, logits: torch.Tensor) -> torch.Tensor:
    """Softmax over real vocabulary tokens, written out by hand."""
    valid = valid_mask(model)
    return torch.where(valid, logits, torch.full_like(logits, float("-inf"))).softmax(-1)


# --------------------------------------------------------------------------------------
# Against the independent reference
# --------------------------------------------------------------------------------------


def test_matches_hf_reference(case, probes):
    """Every (probe, source, layer) row equals the HF model with its attention mask edited per layer,
    and some rows differ clearly from the clean run (blocking is not a no-op)."""
    model, hf_model = case
    chosen = chosen_probes(probes)
    result = attention_knockout(model, chosen, AttentionKnockoutOptions(sources=ALL_SOURCES, window=2), batch_size=7)
    rows = result.rows
    assert len(rows) == len(chosen) * len(ALL_SOURCES) * model.n_layers
    tokens = {p.id: t for p, t in zip(chosen, tokenize_probes(model, chosen))}
    by_id = {p.id: p for p in chosen}
    largest_effect = 0.0
    for probe_id, part in rows.groupby("probe_id"):
        toks = tokens[probe_id]
        clean = hf_blocked_logits(hf_model, toks.prompt_ids, [], ())
        clean_probs = masked_probs(model, clean)
        pred = int(clean_probs.argmax())
        assert int(part["clean_pred_id"].iloc[0]) == pred
        assert part["clean_prob"].iloc[0] == pytest.approx(float(clean_probs[pred]), abs=prob_atol(model, clean))
        positions = source_positions(model.tokenizer, by_id[probe_id], toks)
        for row in part.itertuples():
            if not positions[row.source]:
                assert np.isnan(row.prob) and np.isnan(row.rel_change) and np.isnan(row.logp_change) and row.reason
                continue
            logits = hf_blocked_logits(hf_model, toks.prompt_ids, range(row.window_first, row.window_last + 1),
                                       positions[row.source])
            probs = masked_probs(model, logits)
            assert row.prob == pytest.approx(float(probs[pred]), abs=prob_atol(model, logits)), (
                probe_id, row.source, row.layer)
            logp_change = float(probs[pred].log() - clean_probs[pred].log())  # natural log, by hand
            assert row.logp_change == pytest.approx(logp_change, abs=prob_atol(model, logits) + prob_atol(model, clean))
            top = int(probs.argmax())
            near_tie = float(logits[top] - logits[pred]) <= logit_atol(model, logits)  # either answer is right
            assert row.changed == (top != pred) or near_tie
            assert row.n_blocked == len(positions[row.source]) and row.reason == ""
            largest_effect = max(largest_effect, float((logits - clean).abs().max()))
    assert largest_effect > 0.1  # the reference itself moves: agreement above is not trivial


def test_logits_match_hf_reference(case, probes):
    """The logits themselves, for hand-picked blocks in one batch, including one beside an empty
    block, with and without the prefix cache, on a short prompt and one longer than the sliding window."""
    model, hf_model = case
    for probe in (EXTRA_PROBES[0], LONG_PROBE):
        toks = tokenize_probes(model, [probe])[0]
        positions = source_positions(model.tokenizer, probe, toks)
        assert positions["last_word"]  # the split word gives a non-empty last_word source
        n = model.n_layers
        everything = tuple(range(len(toks.prompt_ids) - 1))
        blocks = [Block((0,), positions["context"]), Block(tuple(range(n)), positions["context"]),
                  Block((n - 1,), positions["last_word"]), Block((), ()), Block((1, 2), (0,)),
                  Block(tuple(range(n)), everything), Block((0, 1), everything[-3:])]
        for use_kv in (True, False):
            runner = PromptRunner(model, toks.prompt_ids, use_kv=use_kv)
            fast = knockout_logits(runner, blocks)
            for row, block in enumerate(blocks):
                slow = hf_blocked_logits(hf_model, toks.prompt_ids, block.layers, block.positions)
                torch.testing.assert_close(fast[row], slow, atol=logit_atol(model, slow), rtol=0,
                                           msg=f"{probe.id} {block} kv={use_kv}")


# --------------------------------------------------------------------------------------
# Not a no-op; nothing to block is exactly clean
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["tiny_model", "tiny_llama"])
def test_blocking_is_not_a_no_op(which, request, probes):
    model = request.getfixturevalue(which)
    toks = tokenize_probes(model, [probes[2]])[0]
    runner = PromptRunner(model, toks.prompt_ids, use_kv=True)
    clean = runner.run(1, [])[0]
    context = tuple(range(1, len(toks.prompt_ids) - 1))
    blocked = knockout_logits(runner, [Block((l,), context) for l in range(model.n_layers)]
                              + [Block(tuple(range(model.n_layers)), context)])
    assert float((blocked - clean).abs().max(dim=-1).values.max()) > 0.1
    assert float((blocked[-1] - clean).abs().max()) > 0.1  # every layer: a clear change


@pytest.mark.parametrize("which", ["tiny_model", "tiny_llama"])
def test_nothing_to_block_equals_clean(which, request, probes):
    """An empty source set, a window outside the model (or no layers) leave their rows exactly as
    the unblocked row of the same batch, and as the clean run, beside a row that does change."""
    model = request.getfixturevalue(which)
    toks = tokenize_probes(model, [probes[2]])[0]
    n = model.n_layers
    runner = PromptRunner(model, toks.prompt_ids, use_kv=True)
    clean = runner.run(1, [])[0]
    blocks = [Block((), ()), Block(tuple(range(n)), ()), Block((n, n + 1), (1, 2)), Block((-2, -1), (1,)),
              Block((), (1, 2)), Block(tuple(range(n)), (1, 2, 3))]
    logits = knockout_logits(runner, blocks)
    atol = logit_atol(model, clean)  # fp32 noise: a multithreaded GEMM may sum rows in other orders
    for row in range(1, 5):
        torch.testing.assert_close(logits[row], logits[0], atol=atol, rtol=0)
    torch.testing.assert_close(logits[0], clean, atol=atol, rtol=0)  # batch shape: fp32 noise only
    assert float((logits[5] - clean).abs().max()) > 0.1


# Ordinary text: the same sources as an idiom (kind plays no part), punctuation inside words.
TEXT_PROBES = [
    Probe(id="text-market", prompt="she walked to the", target="market", kind="text"),
    Probe(id="text-animal", prompt="the animal's primary protection is its", target="tough", kind="text",
          source="wikipedia 'Aardvark' sentence 26"),
]


def test_text_probes_and_one_layer_windows(case):
    """Text probes with window=1: the context is the tokens of every earlier word, context and
    last word together are every position between the BOS and the last, and each one-layer row
    equals the HF model with only that layer's mask edited."""
    model, hf_model = case
    result = attention_knockout(model, TEXT_PROBES, AttentionKnockoutOptions(sources=ALL_SOURCES, window=1))
    n = model.n_layers
    rows = result.rows
    assert len(rows) == len(TEXT_PROBES) * len(ALL_SOURCES) * n and result.settings["n_configs"] == 3 * n
    assert (rows["layer"] == rows["window_first"]).all() and (rows["layer"] == rows["window_last"]).all()
    assert set(result.probes["group"]) == {"ordinary text"} and set(result.probes["kind"]) == {"text"}
    decode = model.tokenizer.decode
    for probe, toks in zip(TEXT_PROBES, tokenize_probes(model, TEXT_PROBES)):
        positions = source_positions(model.tokenizer, probe, toks)
        last = len(toks.prompt_ids) - 1
        earlier, last_word = probe.prompt.rsplit(" ", 1)
        assert decode([toks.prompt_ids[i] for i in positions["context"]]) == earlier
        assert decode([toks.prompt_ids[i] for i in (*positions["last_word"], last)]) == f" {last_word}"
        assert sorted(positions["context"] + positions["last_word"]) == list(range(1, last))
        part = rows[rows["probe_id"] == probe.id]
        clean = hf_blocked_logits(hf_model, toks.prompt_ids, [], ())
        pred = int(part["clean_pred_id"].iloc[0])
        for row in part[part["source"] == "context"].itertuples():
            assert row.n_blocked == len(positions["context"]) > 0 and row.reason == ""
            logits = hf_blocked_logits(hf_model, toks.prompt_ids, [row.layer], positions["context"])
            assert row.prob == pytest.approx(float(masked_probs(model, logits)[pred]), abs=prob_atol(model, logits))
            want = float(masked_probs(model, logits)[pred].log() - masked_probs(model, clean)[pred].log())
            assert row.logp_change == pytest.approx(want, abs=prob_atol(model, logits) + prob_atol(model, clean))
    assert rows["logp_change"].abs().max() > 0.01  # one layer's block moves something
    summary = result.summary()
    assert set(summary["group"]) == {"ordinary text"} and (summary["n"] > 0).any()
    assert {"logp_change", "logp_change_median", "changed_low", "changed_high"} <= set(summary.columns)


def test_logp_change_is_the_log_ratio_of_the_probabilities(tiny_model, probes):
    """logp_change (from the log-softmax) and the relative change agree with prob and clean_prob."""
    result = attention_knockout(tiny_model, probes, AttentionKnockoutOptions(sources=("context",), window=1))
    rows = result.rows[result.rows["reason"] == ""]
    np.testing.assert_allclose(rows["logp_change"], np.log(rows["prob"]) - np.log(rows["clean_prob"]),
                               rtol=0, atol=1e-5)  # fp32 log-softmax against the log of its exp
    np.testing.assert_allclose(rows["rel_change"], np.expm1(rows["logp_change"]), rtol=1e-4, atol=1e-6)


def test_empty_source_gets_nan_with_reason(tiny_model):
    """A one-word prompt has no context; its rows are missing values with a reason, not an error."""
    result = attention_knockout(tiny_model, EXTRA_PROBES,
                                AttentionKnockoutOptions(sources=("context", "last_word"), window=1))
    frame = result.to_dataframe()
    empty = frame[(frame["probe_id"] == "one-word") & (frame["source"] == "context")]
    assert len(empty) == tiny_model.n_layers and empty["prob"].isna().all() and empty["changed"].isna().all()
    assert (empty["n_blocked"] == 0).all() and empty["reason"].str.contains("single word").all()
    ran = frame[(frame["probe_id"] == "split")]
    assert ran["prob"].notna().all() and (ran["reason"] == "").all()
    summary = result.summary()
    assert (summary["n"] == 1).all()  # each (set, source) keeps only the probes where the source exists


# --------------------------------------------------------------------------------------
# Batching, determinism, positions, windows
# --------------------------------------------------------------------------------------


def test_batched_equals_unbatched_and_repeatable(tiny_model, probes):
    chosen = chosen_probes(probes)[:4]
    options = AttentionKnockoutOptions(sources=("context", "bos"), window=3)
    one = attention_knockout(tiny_model, chosen, options, batch_size=1)
    many = attention_knockout(tiny_model, chosen, options, batch_size=64)
    again = attention_knockout(tiny_model, chosen, options, batch_size=64)
    np.testing.assert_allclose(one.rows["prob"], many.rows["prob"], atol=probes_prob_atol(tiny_model, chosen), rtol=0)
    assert one.rows["changed"].tolist() == many.rows["changed"].tolist()
    pd.testing.assert_frame_equal(many.rows, again.rows)
    pd.testing.assert_frame_equal(many.probes, again.probes)


def test_source_positions(tiny_model):
    probe = EXTRA_PROBES[0]  # "once in a zyxblue": BOS, once, in, a, then zyxblue in several tokens
    toks = tokenize_probes(tiny_model, [probe])[0]
    n = len(toks.prompt_ids)
    assert toks.has_bos and n >= 6
    pos = source_positions(tiny_model.tokenizer, probe, toks)
    assert pos["bos"] == (0,)
    assert pos["context"] == (1, 2, 3)
    assert pos["last_word"] == tuple(range(4, n - 1))
    decoded = tiny_model.tokenizer.decode([toks.prompt_ids[i] for i in range(4, n)])
    assert decoded.strip() == "zyxblue"
    single = tokenize_probes(tiny_model, [EXTRA_PROBES[1]])[0]
    assert source_positions(tiny_model.tokenizer, EXTRA_PROBES[1], single) == {"context": (), "last_word": (),
                                                                              "bos": (0,)}


def test_layer_windows():
    assert layer_windows(5, 3) == [(0, 0, 1), (1, 0, 2), (2, 1, 3), (3, 2, 4), (4, 3, 4)]
    assert layer_windows(4, 2) == [(0, 0, 0), (1, 0, 1), (2, 1, 2), (3, 2, 3)]
    assert layer_windows(3, 1) == [(0, 0, 0), (1, 1, 1), (2, 2, 2)]
    assert layer_windows(3, 9) == [(0, 0, 2), (1, 0, 2), (2, 0, 2)]


def test_windows_recorded(tiny_model, probes):
    result = attention_knockout(tiny_model, probes[:1], AttentionKnockoutOptions(window=2))
    assert result.settings["window"] == 2 and result.settings["sources"] == ["context"]
    assert result.settings["mechanism"] == ak.MECHANISM and "versions" in result.settings
    assert result.rows[["layer", "window_first", "window_last"]].values.tolist() == [[0, 0, 0], [1, 0, 1], [2, 1, 2]]


# --------------------------------------------------------------------------------------
# The run-time mechanism check, bad input, saving
# --------------------------------------------------------------------------------------


def test_mechanism_check_catches_an_ignored_hook(tiny_model, probes, monkeypatch):
    """Were the scores hook only observed (a bridge delegating attention), the run must stop."""
    real = ak.blocking_hooks

    def observing(*args, **kwargs):
        return [(name, lambda x, hook: None) for name, _ in real(*args, **kwargs)]

    monkeypatch.setattr(ak, "blocking_hooks", observing)
    with pytest.raises(FastPathError, match="did not zero the blocked attention weights"):
        attention_knockout(tiny_model, probes[:2])


@pytest.mark.parametrize("kwargs, message", [
    ({"sources": ("context", "subject")},
     r"sources must be one or more of context, last_word, bos, got \['context', 'subject'\]"),
    ({"sources": ()}, "sources must be one or more of"),
    ({"window": 0}, "window must be a whole number of layers >= 1, got 0"),
    ({"window": -3}, "window must be a whole number of layers >= 1, got -3"),
    ({"window": 2.5}, "window must be a whole number of layers >= 1, got 2.5"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
])
def test_bad_input(tiny_model, probes, kwargs, message):
    batch_size = kwargs.pop("batch_size", 64)
    with pytest.raises(InputError, match=message):
        attention_knockout(tiny_model, probes[:2], AttentionKnockoutOptions(**kwargs), batch_size=batch_size)


def test_no_probes(tiny_model):
    with pytest.raises(InputError, match="no probes given: expected at least one probe"):
        attention_knockout(tiny_model, [])


def test_blocking_the_last_position_is_refused(tiny_model, probes):
    toks = tokenize_probes(tiny_model, [probes[0]])[0]
    runner = PromptRunner(tiny_model, toks.prompt_ids, use_kv=True)
    with pytest.raises(InputError, match="blocked positions must be in"):
        knockout_logits(runner, [Block((0,), (len(toks.prompt_ids) - 1,))])


def test_save_load_round_trip(tiny_model, probes, tmp_path):
    result = attention_knockout(tiny_model, [*probes[:3], *EXTRA_PROBES],
                                AttentionKnockoutOptions(sources=ALL_SOURCES, window=2))
    paths = result.save(tmp_path)
    assert (tmp_path / "attention_knockout.result.json") in paths
    back = AttentionKnockoutResult.load(tmp_path)
    pd.testing.assert_frame_equal(back.rows, result.rows)
    pd.testing.assert_frame_equal(back.probes, result.probes)
    assert back.settings == result.settings
    pd.testing.assert_frame_equal(back.summary(), result.summary())
    summary = pd.read_parquet(tmp_path / "attention_knockout_summary.parquet")
    assert {"group", "source", "layer", "n", "rel_change", "rel_change_low", "rel_change_high"} <= set(summary.columns)
    frame = result.to_dataframe()
    assert {"kind", "group", "rel_change", "changed", "clean_prob"} <= set(frame.columns)


def test_summary_interval(tiny_model, probes):
    result = attention_knockout(tiny_model, probes, AttentionKnockoutOptions(sources=("context",), window=1))
    summary = result.summary()
    frame = result.to_dataframe()
    for row in summary.itertuples():
        part = frame[(frame["group"] == row.group) & (frame["layer"] == row.layer)]
        assert row.n == len(part)
        assert row.rel_change == pytest.approx(part["rel_change"].mean())  # the same float64 mean
        assert row.rel_change_low <= row.rel_change + 1e-12 and row.rel_change <= row.rel_change_high + 1e-12
    assert (summary.loc[summary["n"] > 2, "rel_change_high"] > summary.loc[summary["n"] > 2, "rel_change_low"]).all()


# --------------------------------------------------------------------------------------
# The embedded model
# --------------------------------------------------------------------------------------


@pytest.mark.embedded
def test_embedded_matches_hf_reference(embedded_model):
    """Gemma 3 270M: a memorized idiom, the context and last-word sources, a few windows, against
    the HF model's edited attention mask."""
    model = embedded_model
    probe = Probe(id="stone", prompt="kill two birds with one", target="stone", kind="idiom")
    result = attention_knockout(model, [probe], AttentionKnockoutOptions(sources=("context", "bos"), window=5))
    hf_model = load_hf_model(model.source_path)
    toks = tokenize_probes(model, [probe])[0]
    positions = source_positions(model.tokenizer, probe, toks)
    assert positions["context"] == tuple(range(1, len(toks.prompt_ids) - 1))
    pred = int(result.rows["clean_pred_id"].iloc[0])
    n = model.n_layers
    for row in result.rows[result.rows["layer"].isin([0, n // 2, n - 1])].itertuples():
        logits = hf_blocked_logits(hf_model, toks.prompt_ids, range(row.window_first, row.window_last + 1),
                                   positions[row.source])
        assert row.prob == pytest.approx(float(masked_probs(model, logits)[pred]), abs=prob_atol(model, logits))
    assert result.rows["rel_change"].abs().max() > 0.01

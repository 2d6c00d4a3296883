"""Attention knockout (after Geva et al. 2023, "Dissecting Recall of Factual Associations").

Does the last prompt position read the idiom's earlier words through attention, and in which
layers? We cut the attention edges from the last prompt position (the query) to a set of source
positions (the keys) in a window of consecutive layers, and measure how much the probability of
the model's clean prediction changes. Sliding the window over the depth shows where the
information moves to the last position; comparing memorized with non-memorized idioms shows
whether recall of a memorized sequence depends on it differently.

Sources (`SOURCES`), computed per probe from the tokenizer's character offsets:
- ``context`` (default): the tokens of every prompt word but the last (never the BOS);
- ``last_word``: the tokens of the last prompt word except the last position itself (empty when
  that word is one token: the probe then gets NaN for this source, with a reason);
- ``bos``: position 0, the BOS token (empty without a BOS).

Windows: `window` consecutive layers centred on layer l, clipped at the edges, for every l:
layers max(0, l - window // 2) .. min(n_layers, l - window // 2 + window) - 1. ``window=1`` cuts
one layer at a time; it costs no more than a wider window (one configuration per layer either way,
each with fewer hooks): on Gemma 3 270M, 12 probes x 3 sources x 18 layers took 15-60 s on two
shared CPU cores, whatever the window.

Mechanism (`MECHANISM`): a hook on ``blocks.{l}.attn.hook_attn_scores`` sets the pre-softmax
score of each blocked edge (query = last prompt position, key = a source position) to -inf, in
every head of every layer of the window; the softmax then renormalizes the remaining weights
(the authors' way). Under the installed TransformerLens 4.x the RoPE attention bridge
(`PositionEmbeddingsAttentionBridge`, used for Gemma 3 and Llama) recomputes attention itself and
feeds the hook's return value into its softmax, so this hook edits the computation; a bridge that
delegated attention to the Hugging Face module would only let it observe. `attention_knockout`
therefore checks once per call, on its first probe, that the blocked edges get zero weight in
``hook_pattern`` (`FastPathError` otherwise), and the tests compare the result with blocking done
independently on the Hugging Face model (its attention mask edited per layer).

Speed: only the last position's query is edited, so each probe's prefix key/value cache is reused
(`PromptRunner(use_kv=True)`, checked against a plain full forward once per call): one token per
configuration, configurations as the rows of a batch. In a sliding-window layer the cache keeps
only the window's keys; positions before it are invisible to the last query anyway.

Text probes (kind "text", ordinary sentences) get the same sources as idioms: ``context`` is the
tokens of every earlier word of the prompt, ``last_word`` the earlier tokens of its last word; the
two together are every prompt position between the BOS and the last one. No source depends on the
probe's kind (nor on its data-source field `Probe.source`, which has nothing to do with these).

Metrics per (probe, source, layer), over real vocabulary tokens only (`idiom_lens.models.vocab`),
always of the model's clean prediction (its greedy token on the unblocked prompt):
- ``prob``: its probability after blocking;
- ``logp_change`` = log prob - log clean_prob (natural log, from the log-softmax): the measure to
  average. It is symmetric (halving and doubling are -0.69 and +0.69) and unbounded both ways;
- ``rel_change`` = (prob - clean_prob) / clean_prob, the *relative* change, kept for older
  readers: it is bounded at -1 below and unbounded above, so its mean over probes is pulled up by
  the few probes whose low clean probability grows several-fold, most in low-confidence sets;
- ``changed``: whether the greedy prediction changed.

`AttentionKnockoutResult.summary()` gives per set, source and layer the mean and median of
``logp_change`` and ``rel_change`` with 95% percentile-bootstrap intervals over probes and the
share of changed predictions with its Wilson interval. Memorized idioms are more confident than
non-memorized ones, so `confidence_matched` restricts the comparison to memorized idioms and
non-memorized idioms of about the same clean probability.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from idiom_lens.analyses.memorization import probe_group
from idiom_lens.analyses.saved import ProbeRowsResult
from idiom_lens.analyses.stats import bootstrap_statistics, match_nearest, percentile_interval, wilson_interval
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.selection import check_probes
from idiom_lens.errors import FastPathError, InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.loading import LoadedModel, require_causal
from idiom_lens.models.runners import PromptRunner, last_metrics, masked_prediction
from idiom_lens.models.selfcheck import versions_text
from idiom_lens.models.tokenization import ProbeTokens
from idiom_lens.models.vocab import mask_logits, mask_summary, valid_mask
from idiom_lens.types import HookFn

SOURCES: tuple[str, ...] = ("context", "last_word", "bos")
MECHANISM = "hook_attn_scores=-inf"  # recorded in the settings
MECHANISM_TEXT = ("blocks.{l}.attn.hook_attn_scores: pre-softmax score of each blocked edge (query = last prompt "
                  "position, key = a source position) set to -inf in every head, so the softmax renormalizes")

_EMPTY_REASON = {
    "context": "the prompt is a single word: no context tokens to block",
    "last_word": "the last prompt word is a single token: nothing but the last position itself",
    "bos": "the prompt has no BOS token",
}


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


def check_sources(sources: Sequence[str]) -> tuple[str, ...]:
    """The sources in the given order without repeats; `InputError` for none or an unknown one."""
    if isinstance(sources, str):
        sources = (sources,)
    sources = tuple(dict.fromkeys(sources))
    bad = [s for s in sources if s not in SOURCES]
    if not sources or bad:
        raise InputError(f"sources must be one or more of {', '.join(SOURCES)}, got {list(sources)}")
    return sources


def check_window(window: int) -> int:
    """`window` as an int if it is a whole number >= 1, else `InputError`."""
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise InputError(f"window must be a whole number of layers >= 1, got {window!r}")
    return int(window)


def layer_windows(n_layers: int, window: int) -> list[tuple[int, int, int]]:
    """(centre, first, last) for every layer l: `window` consecutive layers centred on l, clipped
    at the edges, i.e. layers max(0, l - window // 2) .. min(n_layers, l - window // 2 + window) - 1."""
    window = check_window(window)
    out = []
    for layer in range(n_layers):
        start = layer - window // 2
        out.append((layer, max(0, start), min(n_layers, start + window) - 1))
    return out


# --------------------------------------------------------------------------------------
# Source positions from the tokenization
# --------------------------------------------------------------------------------------


def source_positions(tokenizer: Any, probe: Probe, tokens: ProbeTokens) -> dict[str, tuple[int, ...]]:
    """The prompt positions of every source (`SOURCES`) for one probe.

    Word boundaries come from the tokenizer's character offsets of ``prompt + " " + target`` (the
    text `split_probe` tokenized): a token belongs to the last prompt word when it ends after that
    word's first character, or is the bare space just before it (a leading space travels with its
    word, as in "▁word" or "Ġword"), otherwise to the context. The BOS is never in a word. Raises
    `InputError` if the re-tokenization does not give the probe's prompt tokens back.
    """
    prompt_ids = tokens.prompt_ids
    text = f"{probe.prompt} {probe.target}"
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids: list[int] = list(encoded["input_ids"])
    offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]
    bos_id = tokenizer.bos_token_id
    if ids and bos_id is not None and ids[0] == bos_id and offsets[0] == (0, 0):  # handled by has_bos below
        ids, offsets = ids[1:], offsets[1:]
    first = int(tokens.has_bos)
    body = list(prompt_ids[first:])
    if ids[: len(body)] != body:
        raise InputError(f"probe {probe.id!r}: tokenizing {text!r} again did not give its prompt tokens back")
    words = probe.prompt.split()
    stripped = probe.prompt.rstrip()
    last_word_start = len(stripped) - len(words[-1])
    context, last_word = [], []
    for i, (start, end) in enumerate(offsets[: len(body)]):
        lone_space = end == last_word_start and text[start:end].isspace()  # the space before the word
        (last_word if end > last_word_start or lone_space else context).append(first + i)
    last = len(prompt_ids) - 1
    return {
        "context": tuple(context),
        "last_word": tuple(p for p in last_word if p != last),
        "bos": (0,) if tokens.has_bos else (),
    }


# --------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    """One configuration: cut the last position's attention to `positions` (prompt positions
    before the last one) in `layers`. Layers outside the model hold nothing to block and are
    ignored; so does a block without positions: its row is the clean run."""

    layers: tuple[int, ...]
    positions: tuple[int, ...]


def blocked_key_masks(
    blocks: Sequence[Block], *, n_layers: int, n_keys: int
) -> dict[int, Bool[Tensor, "row key"]]:
    """Per layer with anything to block: which keys each row (configuration) cuts from the last query."""
    masks: dict[int, Tensor] = {}
    for row, block in enumerate(blocks):
        if any(p < 0 or p >= n_keys - 1 for p in block.positions):
            raise InputError(f"blocked positions must be in 0..{n_keys - 2} (the prompt before its last position), "
                             f"got {list(block.positions)}")
        if not block.positions:
            continue
        for layer in set(block.layers):
            if 0 <= layer < n_layers:
                mask = masks.setdefault(layer, torch.zeros(len(blocks), n_keys, dtype=torch.bool))
                mask[row, list(block.positions)] = True
    return masks


def blocking_hooks(
    blocks: Sequence[Block], *, n_layers: int, n_keys: int, query: int
) -> list[tuple[str, HookFn]]:
    """Hooks on ``blocks.{l}.attn.hook_attn_scores`` ([row, head, query, key], pre-softmax) that set
    the score of every blocked edge of row r (query `query`, key in its positions) to -inf.

    The hook's keys are the last prompt positions: all `n_keys` of them, or fewer in a sliding-window
    layer whose key/value cache keeps only the window (positions before it are invisible anyway)."""
    hooks: list[tuple[str, HookFn]] = []
    for layer, mask in sorted(blocked_key_masks(blocks, n_layers=n_layers, n_keys=n_keys).items()):

        def cut(scores: Tensor, hook: Any, mask: Tensor = mask) -> Tensor:
            n_seen = scores.shape[-1]
            if scores.ndim != 4 or scores.shape[0] != mask.shape[0] or n_seen > n_keys or scores.shape[-2] <= query:
                raise FastPathError(
                    f"attention knockout: {hook.name} has shape {tuple(scores.shape)}, expected [{mask.shape[0]}, "
                    f"head, >{query}, <={n_keys}] ({versions_text()}); nothing was written")
            scores = scores.clone()
            row = scores[:, :, query]  # [row, head, key]
            seen = mask[:, n_keys - n_seen :].to(scores.device)
            scores[:, :, query] = row.masked_fill(seen[:, None, :], float("-inf"))
            return scores

        hooks.append((f"blocks.{layer}.attn.hook_attn_scores", cut))
    return hooks


def knockout_logits(runner: PromptRunner, blocks: Sequence[Block]) -> Float[Tensor, "row d_vocab"]:
    """Last-position logits of the runner's prompt with each row's block applied (one row per block)."""
    n_keys = len(runner.prompt_ids)
    hooks = blocking_hooks(blocks, n_layers=runner.model.n_layers, n_keys=n_keys, query=runner.last)
    return runner.run(len(blocks), hooks)


def log_prob_of(
    logits: Float[Tensor, "row d_vocab"], valid: Bool[Tensor, " d_vocab"], token: int
) -> Float[np.ndarray, " row"]:
    """Natural log probability of `token` per row, over real vocabulary tokens (`valid`): from
    the log-softmax, so it stays finite where the probability underflows."""
    log_probs = mask_logits(logits.float(), valid).log_softmax(dim=-1)
    return log_probs[:, token].cpu().numpy().astype(np.float64)


def check_mechanism(runner: PromptRunner, block: Block, *, probe: str) -> None:
    """Stop (`FastPathError`) unless blocking really reaches the attention weights under the
    installed versions: with `block` applied, every layer of its window must give the blocked
    edges zero weight in ``hook_pattern`` (post-softmax) and the last query's weights must still
    sum to one. A bridge that only observes ``hook_attn_scores`` fails here."""
    n_layers = runner.model.n_layers
    layers = sorted({l for l in block.layers if 0 <= l < n_layers})
    seen: dict[int, Tensor] = {}

    def capture(layer: int) -> HookFn:
        def hook(pattern: Tensor, hook: Any) -> None:  # [head, key] over all prompt positions
            weights = pattern[0, :, runner.last].detach().float().cpu()
            seen[layer] = torch.nn.functional.pad(weights, (len(runner.prompt_ids) - weights.shape[-1], 0))

        return hook

    hooks = blocking_hooks([block], n_layers=n_layers, n_keys=len(runner.prompt_ids), query=runner.last)
    hooks += [(f"blocks.{l}.attn.hook_pattern", capture(l)) for l in layers]
    runner.run(1, hooks)
    positions = list(block.positions)
    for layer in layers:
        weights = seen.get(layer)
        if weights is None or float(weights[:, positions].abs().max()) != 0.0 or \
                float((weights.sum(-1) - 1).abs().max()) > 1e-4:
            raise FastPathError(
                f"attention knockout: setting blocks.{layer}.attn.hook_attn_scores to -inf did not zero the "
                f"blocked attention weights in hook_pattern on probe {probe!r} ({versions_text()}): this bridge "
                "does not feed the hook into its softmax; nothing was written")


# --------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------


SUMMARY_COLUMNS: tuple[str, ...] = (
    "group", "source", "layer", "window_first", "window_last", "n",
    "rel_change", "rel_change_low", "rel_change_high", "changed", "prob", "clean_prob",  # the columns of old summaries
    "rel_change_median", "logp_change", "logp_change_low", "logp_change_high", "logp_change_median",
    "logp_change_median_low", "logp_change_median_high", "n_changed", "changed_low", "changed_high",
)


def logp_changes(rows: pd.DataFrame) -> Float[np.ndarray, " row"]:
    """The rows' ``logp_change``; for rows saved before it existed, log prob - log clean_prob
    (the same quantity, through the rounded probabilities: -inf where prob underflowed to 0)."""
    if "logp_change" in rows.columns:
        return rows["logp_change"].to_numpy(dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(rows["prob"].to_numpy(dtype=np.float64)) - np.log(rows["clean_prob"].to_numpy(dtype=np.float64))


def _mean_and_median(resampled: np.ndarray) -> np.ndarray:
    """[n_boot, n, ...] resamples -> [n_boot, 2, ...]: mean and median over the n probes."""
    return np.stack([resampled.mean(axis=1), np.median(resampled, axis=1)], axis=1)


def mean_median_intervals(
    values: Float[np.ndarray, "probe ..."], *, n_boot: int, level: float, seed: int
) -> tuple[Float[np.ndarray, "2 ..."], Float[np.ndarray, "2 ..."], Float[np.ndarray, "2 ..."]]:
    """Mean and median over probes (axis 0) with their percentile-bootstrap intervals: (point,
    low, high), each [2 (mean, median), ...]. One set of resamples for every column, drawn as
    `bootstrap_mean_ci` draws them (so its mean intervals come out the same). With fewer than two
    probes the intervals collapse to the point; with none everything is NaN."""
    values = np.asarray(values, dtype=np.float64)
    if values.shape[0] == 0:
        nan = np.full((2, *values.shape[1:]), np.nan)
        return nan, nan.copy(), nan.copy()
    point = np.stack([values.mean(axis=0), np.median(values, axis=0)])
    if values.shape[0] < 2:
        return point, point.copy(), point.copy()
    samples = bootstrap_statistics(values, _mean_and_median, n_boot=n_boot, rng=seed)
    low, high = percentile_interval(samples, level)
    return point, low, high


def knockout_summary(frame: pd.DataFrame, *, level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per set, source and layer of a result's tidy rows (`AttentionKnockoutResult.to_dataframe`):
    the columns `SUMMARY_COLUMNS` (see `AttentionKnockoutResult.summary`)."""
    frame = frame.assign(logp_change=logp_changes(frame))
    out = []
    for (group, source), part in frame.groupby(["group", "source"], sort=True):
        layers = part.drop_duplicates("layer").sort_values("layer")[["layer", "window_first", "window_last"]]
        ran = part[part["reason"] == ""]
        grids = [ran.pivot(index="probe_id", columns="layer", values=column).reindex(columns=layers["layer"])
                 for column in ("logp_change", "rel_change")]
        values = np.stack([g.to_numpy(dtype=np.float64) for g in grids], axis=-1)  # [probe, layer, measure]
        n = values.shape[0]
        # each [stat (mean, median), layer, measure (logp_change, rel_change)]
        point, low, high = mean_median_intervals(values, n_boot=n_boot, level=level, seed=seed)
        by_layer = ran.groupby("layer")
        n_changed = by_layer["changed"].sum().reindex(layers["layer"]).fillna(0).to_numpy(dtype=np.int64)
        changed_low, changed_high = wilson_interval(n_changed, n, level=level)
        means = by_layer[["prob", "clean_prob"]].mean().reindex(layers["layer"])
        out.append(pd.DataFrame({
            "group": group, "source": source, "layer": layers["layer"].to_numpy(),
            "window_first": layers["window_first"].to_numpy(), "window_last": layers["window_last"].to_numpy(),
            "n": n, "rel_change": point[0, :, 1], "rel_change_low": low[0, :, 1], "rel_change_high": high[0, :, 1],
            "changed": n_changed / n if n else np.full(len(layers), np.nan),
            "prob": means["prob"].to_numpy(dtype=np.float64),
            "clean_prob": means["clean_prob"].to_numpy(dtype=np.float64),
            "rel_change_median": point[1, :, 1],
            "logp_change": point[0, :, 0], "logp_change_low": low[0, :, 0], "logp_change_high": high[0, :, 0],
            "logp_change_median": point[1, :, 0], "logp_change_median_low": low[1, :, 0],
            "logp_change_median_high": high[1, :, 0],
            "n_changed": n_changed, "changed_low": changed_low, "changed_high": changed_high,
        }))
    if not out:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    return pd.concat(out, ignore_index=True)[list(SUMMARY_COLUMNS)]


@dataclass(frozen=True)
class AttentionKnockoutResult(ProbeRowsResult):
    """One row per (probe, source, layer): the clean prediction's probability after cutting the
    last position's attention to the source in the window around the layer; one row per probe.

    Rows: probe_id, source, layer (window centre), window_first, window_last, n_blocked,
    clean_pred_id, clean_prob, prob, rel_change (the relative change (prob - clean_prob) /
    clean_prob), logp_change (log prob - log clean_prob, natural log), changed, new_pred_id, reason
    ("" when run; else why the source is empty for this probe, and prob, rel_change, logp_change,
    changed are missing). Results saved before logp_change existed load without it; `summary`
    derives it from prob and clean_prob.
    `to_dataframe` adds kind and group; `save`/`load` come from `ProbeRowsResult`:
    `attention_knockout.parquet`, `attention_knockout_probes.parquet`,
    `attention_knockout_summary.parquet` and the descriptor.
    """

    default_name = "attention_knockout"

    def summary(self, *, level: float = 0.95, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """Per set, source and layer, over the probes whose source is not empty (`n`):

        - ``logp_change`` (mean) and ``logp_change_median``, each with its percentile-bootstrap
          interval (``_low``/``_high``, at `level`): the change of the clean prediction's log probability;
        - ``rel_change`` (mean, with its interval) and ``rel_change_median``: the relative change;
        - ``changed``: the share of probes whose prediction changed (``n_changed`` of ``n``) with
          its Wilson interval ``changed_low``/``changed_high``;
        - ``prob`` and ``clean_prob``: mean probability of the clean prediction after and before.

        One set of resamples of the probes serves every layer and measure of a set and source.
        The columns of older summaries come first, unchanged (`SUMMARY_COLUMNS`)."""
        return knockout_summary(self.to_dataframe(), level=level, n_boot=n_boot, seed=seed)


# --------------------------------------------------------------------------------------
# Confidence matching
# --------------------------------------------------------------------------------------

MATCHING_RULE = ("greedy 1:1 nearest-neighbour matching on the natural log of the clean prediction's probability, "
                 "without replacement, within the caliper, memorized probes in seeded random order "
                 "(idiom_lens.analyses.stats.match_nearest)")


@dataclass(frozen=True)
class MatchedKnockout:
    """The knockout summary of a result restricted to confidence-matched pairs: each probe of
    `group` (memorized idioms) with a probe of `versus` (non-memorized idioms) whose clean
    prediction is about as probable (|log p - log p'| <= `caliper`).

    `summary`: `knockout_summary` of the matched probes of both sets, with ``n_pairs``;
    `pairs`: probe_id, matched_id and both clean probabilities with log_ratio (log p - log p'),
    one row per pair kept; `n_group` / `n_candidates`: the probes of each set before matching.
    """

    summary: pd.DataFrame
    pairs: pd.DataFrame
    group: str
    versus: str
    caliper: float
    n_group: int
    n_candidates: int

    @property
    def n_pairs(self) -> int:
        return len(self.pairs)

    def to_dataframe(self) -> pd.DataFrame:
        """The matched summary (one row per set, source and layer; ``n_pairs`` on every row)."""
        return self.summary.copy()


def _given_pairs(pairs: Any, probes: pd.DataFrame, group: str, versus: str) -> pd.DataFrame:
    """`pairs` ((probe_id, matched_id) tuples or a frame with those columns) checked against the
    result's probes: `InputError` for an unknown id or a probe of the wrong set."""
    if isinstance(pairs, pd.DataFrame):
        if not {"probe_id", "matched_id"} <= set(pairs.columns):
            raise InputError(f"pairs needs the columns probe_id and matched_id, got {list(pairs.columns)}")
        given = pairs[["probe_id", "matched_id"]].astype(str)
    else:
        pairs = [tuple(p) for p in pairs]
        if any(len(p) != 2 for p in pairs):
            raise InputError(f"pairs must be (probe_id, matched_id) tuples, got {pairs[:3]}")
        given = pd.DataFrame(pairs, columns=["probe_id", "matched_id"]).astype(str)
    group_of = probes.set_index("probe_id")["group"]
    for column, wanted in (("probe_id", group), ("matched_id", versus)):
        unknown = sorted(set(given[column]) - set(group_of.index))
        if unknown:
            raise InputError(f"pairs name probes the result does not have: {unknown[:3]}")
        wrong = [i for i in given[column] if group_of[i] != wanted]
        if wrong:
            raise InputError(f"pairs: {column} must be probes of {wanted!r}, got {wrong[:3]} "
                             f"({group_of[wrong[0]]!r})")
    return given.reset_index(drop=True)


def confidence_matched(
    result: AttentionKnockoutResult,
    *,
    caliper: float = math.log(2),
    pairs: Sequence[tuple[str, str]] | pd.DataFrame | None = None,
    group: str = "memorized idioms",
    versus: str = "non-memorized idioms",
    seed: int = 0,
    level: float = 0.95,
    n_boot: int = 1000,
) -> MatchedKnockout:
    """The summary of `result` over memorized idioms (`group`) and their nearest non-memorized
    idioms (`versus`) by the clean prediction's probability on a log scale.

    Why: a memorized idiom's prediction is confident, a non-memorized one's often is not, and how
    much a knockout moves a probability depends on the probability itself; the matched sets
    differ in memorization but hardly in confidence. Matching (`MATCHING_RULE`) keeps a pair only
    within `caliper` in natural log (default log 2: within a factor of two); unmatched probes are
    left out and the number of pairs kept is `n_pairs`. Give `pairs` ((probe_id, matched_id)
    tuples, or a frame with those columns) to use your own pairs instead (`caliper` is then not
    used). Raises `InputError` for a caliper below 0 or pairs naming unknown probes or probes of
    the wrong set.
    """
    if not isinstance(result, AttentionKnockoutResult):
        raise InputError(f"result must be an AttentionKnockoutResult, got {type(result).__name__}")
    if not caliper >= 0:
        raise InputError(f"caliper must be >= 0 (natural log of a probability ratio), got {caliper}")
    probes = result.probes.assign(probe_id=result.probes["probe_id"].astype(str))
    treated = probes[probes["group"] == group].reset_index(drop=True)
    candidates = probes[probes["group"] == versus].reset_index(drop=True)
    if pairs is None:
        match = match_nearest(np.log(treated["clean_prob"].to_numpy(dtype=np.float64)),
                              np.log(candidates["clean_prob"].to_numpy(dtype=np.float64)), caliper=caliper, seed=seed)
        kept = match >= 0
        chosen = pd.DataFrame({"probe_id": treated.loc[kept, "probe_id"].to_numpy(),
                               "matched_id": candidates["probe_id"].to_numpy()[match[kept]]})
    else:
        chosen = _given_pairs(pairs, probes, group, versus)
    prob_of = probes.set_index("probe_id")["clean_prob"]
    chosen = chosen.assign(clean_prob=prob_of.reindex(chosen["probe_id"]).to_numpy(dtype=np.float64),
                           matched_clean_prob=prob_of.reindex(chosen["matched_id"]).to_numpy(dtype=np.float64))
    chosen["log_ratio"] = np.log(chosen["clean_prob"]) - np.log(chosen["matched_clean_prob"])
    frame = result.to_dataframe()
    kept_ids = set(chosen["probe_id"]) | set(chosen["matched_id"])
    frame = frame[frame["probe_id"].astype(str).isin(kept_ids)]
    summary = knockout_summary(frame, level=level, n_boot=n_boot, seed=seed)
    summary.insert(summary.columns.get_loc("n"), "n_pairs", len(chosen))
    return MatchedKnockout(summary=summary, pairs=chosen, group=group, versus=versus,
                           caliper=float(caliper), n_group=len(treated), n_candidates=len(candidates))


# --------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AttentionKnockoutOptions:
    """What `attention_knockout` cuts: the last position's attention to each of `sources`
    (`SOURCES`, each run separately) in a `window` of consecutive layers centred on every layer
    (one window per run). Raises `InputError` for an unknown source or a window below 1."""

    sources: tuple[str, ...] = ("context",)
    window: int = 5

    def __post_init__(self) -> None:
        object.__setattr__(self, "sources", check_sources(self.sources))
        object.__setattr__(self, "window", check_window(self.window))


def attention_knockout(
    model: LoadedModel,
    probes: Sequence[Probe],
    options: AttentionKnockoutOptions = AttentionKnockoutOptions(),
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> AttentionKnockoutResult:
    """Cut the last prompt position's attention to each source in a window of `options.window`
    layers centred on every layer, per probe; one row per (probe, source, layer).

    Each probe runs its clean pass once (prefix key/value cache), then its configurations as rows
    of batches of `batch_size` (speed and memory only: results do not depend on it). A probe whose
    source is empty gets missing metrics and a reason for that source. Raises `InputError` for no
    probes or a batch size below 1; `FastPathError` when a shortcut disagrees with a full forward
    or the block does not reach the attention weights.
    """
    require_causal(model, "the attention knockout")
    if not isinstance(options, AttentionKnockoutOptions):
        raise InputError(f"options must be an AttentionKnockoutOptions, got {type(options).__name__}")
    sources, window = options.sources, options.window
    probes = check_probes(probes)
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    n_layers = model.n_layers
    windows = layer_windows(n_layers, window)
    probe_tokens = tokenize_probes(model, probes)
    positions_of = [source_positions(model.tokenizer, p, t) for p, t in zip(probes, probe_tokens)]
    # the shortcuts under the installed versions, before anything is computed for real
    first = PromptRunner(model, probe_tokens[0].prompt_ids, use_kv=True)
    first.self_check(what="attention knockout", probe=probes[0].id)
    checked = False
    started = time.perf_counter()
    valid = valid_mask(model)
    frames, probe_rows = [], []
    configs = [(source, centre, lo, hi) for source in sources for centre, lo, hi in windows]
    bar = tqdm(total=len(probes) * len(configs), desc="attention knockout", unit="config", disable=not progress)
    for index, (probe, toks, positions) in enumerate(zip(probes, probe_tokens, positions_of)):
        runner = first if index == 0 else PromptRunner(model, toks.prompt_ids, use_kv=True)
        clean_logits = runner.run(1, [])[0]
        pred, prob = masked_prediction(clean_logits, valid)
        clean_logp = float(log_prob_of(clean_logits[None], valid, pred)[0])
        blocks = [Block(tuple(range(lo, hi + 1)), positions[source]) for source, _, lo, hi in configs]
        todo = [i for i, b in enumerate(blocks) if b.positions]
        if todo and not checked:
            check_mechanism(runner, blocks[todo[0]], probe=probe.id)
            checked = True
        new_prob = np.full(len(configs), np.nan)
        new_logp = np.full(len(configs), np.nan)
        changed = pd.array([pd.NA] * len(configs), dtype="boolean")
        new_pred = pd.array([pd.NA] * len(configs), dtype="Int64")
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            logits = knockout_logits(runner, [blocks[i] for i in chunk])
            metrics = last_metrics(logits, pred, prob, toks.target_id, valid=valid)
            new_prob[chunk] = metrics["prob_of_clean_pred"]
            new_logp[chunk] = log_prob_of(logits, valid, pred)
            changed[chunk] = metrics["changed"]
            new_pred[chunk] = metrics["new_pred_id"]
        frames.append(pd.DataFrame({
            "probe_id": probe.id,
            "source": [c[0] for c in configs],
            "layer": [c[1] for c in configs],
            "window_first": [c[2] for c in configs],
            "window_last": [c[3] for c in configs],
            "n_blocked": [len(b.positions) for b in blocks],
            "clean_pred_id": pred,
            "clean_prob": prob,
            "prob": new_prob,
            "rel_change": (new_prob - prob) / prob,
            "logp_change": new_logp - clean_logp,
            "changed": changed,
            "new_pred_id": new_pred,
            "reason": ["" if b.positions else _EMPTY_REASON[c[0]] for c, b in zip(configs, blocks)],
        }))
        memorized = pred == toks.target_id
        probe_rows.append({
            "probe_id": probe.id, "kind": probe.kind, "group": probe_group(probe.kind, memorized),
            "memorized": memorized, "prompt": probe.prompt, "target": probe.target, "target_id": toks.target_id,
            "clean_pred_id": pred, "clean_prob": prob, "n_prompt_tokens": len(toks.prompt_ids),
            **{f"n_{source}": len(positions[source]) for source in SOURCES},
        })
        bar.update(len(configs))
    bar.close()
    settings = model.settings() | mask_summary(model) | {
        "analysis": "attention_knockout", "sources": list(sources), "window": window,
        "windows": [[lo, hi] for _, lo, hi in windows], "mechanism": MECHANISM, "mechanism_detail": MECHANISM_TEXT,
        "query": "last prompt position", "prefix_cache": first.use_kv, "n_probes": len(probes),
        "n_configs": len(configs), "seconds": round(time.perf_counter() - started, 2),
    }
    return AttentionKnockoutResult(rows=pd.concat(frames, ignore_index=True), probes=pd.DataFrame(probe_rows),
                                   settings=settings)

"""Causal tracing (after Meng et al. 2022, ROME): where restoring one clean activation brings the
memorized prediction back into a corrupted run.

- **Corrupt**: Gaussian noise is added to the input embeddings (the residual stream entering
  block 0, i.e. after the model's own embedding scaling: Gemma multiplies by sqrt(d_model)) at
  the noised positions, chosen by the noise design (`noise_designs`, which says what each design
  tests): by default every prompt token but the BOS and the last (``all_but_last``, ROME's: it
  tests whether the last token plus the restored site *suffices*); ``all_but_last_two`` leaves
  the last two words clean; `noise_words` chooses any word span instead. The noise standard
  deviation is `multiplier` (3, as ROME) times the standard deviation of the model's input
  embeddings over the bundled ordinary-text set (`noise_scale`), recorded with the result.
  `noise_samples` draws per probe (default 10), seeded by (seed, probe id).
- **Restore** the clean activation at one position, in one layer or in a window of consecutive
  layers centered on it and clipped at the edges (ROME's windows), for three sites: ``resid``
  (the block's output: the residual stream after layer l), ``mlp`` and ``attn`` (what the MLP and
  attention add to the residual, after Gemma's post-norms).
- **Restored positions**: every position (``positions="all"``), or only the two the recall
  profile reads (``positions="key"``: the last noised token and the last token): two restored
  positions instead of every one from the first noised token on, for the n = 50 per set runs.
  With "key" the result has rows for those two positions only, so its
  summaries have only the position classes "last noised" and "last" (one class, "last", when the
  last token is itself noised).
- **Metric**: the probability of the clean prediction (masked softmax over real vocabulary
  tokens). Indirect effect (IE) = restored - corrupted; total effect (TE) = clean - corrupted;
  both averaged over the noise samples.
- **Comparing sets**: sets whose total effects differ (memorized idioms lose much more to the
  noise than non-memorized ones) are not compared on raw IE alone: `TracingResult.restored_share`
  gives the share of the total effect a site restores, mean IE / mean TE over the probes whose TE
  reaches a stated floor (a ratio of means, with a bootstrap interval over probes), and
  `TracingResult.per_probe` every probe's IE, TE and IE / TE.

Speed: the corrupted run of every noise sample runs once and records the residual stream
entering every block and every layer's keys and values; a restored row resumes at the window's
first layer from it (`SuffixRunner`), so the layers below run once per sample, not once per
cell, and runs only the positions from the restored one on, attending to the corrupted run's
keys and values before it (the same numbers: causal attention leaves those positions as in the
corrupted run). Rows = (cell,
noise sample), in batches. Positions before the first noised token are not run: clean and
corrupted activations there are identical (causal attention), so restoring them changes nothing
and their IE is exactly 0. A masked LM (BERT) attends both ways: every position is run and restored (none is as in the
corrupted run by construction), each restored row over the whole sequence, [SEP] included, and
the prediction is read at the mask ("last"). The first probe is checked at run time against plain full forwards
(clean, and noised through `run_with_hooks`); tests compare every cell with a naive loop of one
full forward per (sample, layer, position) (`tests/reference.py`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from idiom_lens.analyses.interventions.noise_designs import (
    TRACE_DESIGNS,
    NoiseScale,
    check_design,
    noise_scale,
    noised_span,
    plain_forward,
    trace_noise,
)

# Re-exported: the noise primitives lived here before `noise_designs` (the benchmarks import them from here).
from idiom_lens.analyses.interventions.noise_designs import default_noised as default_noised
from idiom_lens.analyses.interventions.noise_designs import word_positions as word_positions
from idiom_lens.analyses.memorization import probe_group
from idiom_lens.analyses.saved import ProbeRowsResult
from idiom_lens.analyses.stats import bootstrap, bootstrap_mean_ci
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.selection import check_probes
from idiom_lens.errors import InputError
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.runners import KVRecorder, PrefixKV, SuffixRunner
from idiom_lens.models.selfcheck import check_close
from idiom_lens.models.tokenization import split_masked_probe, split_probe
from idiom_lens.models.vocab import mask_logits, mask_summary, valid_mask

Site = Literal["resid", "mlp", "attn"]
TRACE_SITES: tuple[str, ...] = ("resid", "mlp", "attn")
HOOKS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
POSITION_CLASSES: tuple[str, ...] = ("before", "first noised", "mid noised", "last noised", "after noised", "last")


def layer_window(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """`window` consecutive layers centered on `layer`, clipped at the model's edges (ROME's rule)."""
    if window < 1:
        raise InputError(f"window must be >= 1, got {window}")
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - window // 2 + window)))


def key_positions(noised: Sequence[int], n_pos: int) -> tuple[int, ...]:
    """The positions ``positions="key"`` restores: the last noised token and the last token (one
    position when the last token is noised)."""
    return tuple(sorted({int(noised[-1]), n_pos - 1}))


def position_class(pos: int, noised: Sequence[int], n_pos: int) -> str:
    """ROME's position kinds: the last prompt token, the first/middle/last noised token, others."""
    if pos == n_pos - 1:
        return "last"
    if pos < noised[0]:
        return "before"
    if pos > noised[-1]:
        return "after noised"
    if pos == noised[-1]:
        return "last noised"
    return "first noised" if pos == noised[0] else "mid noised"


# --------------------------------------------------------------------------------------
# One prompt
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTrace:
    """Causal tracing of one prompt: the probability of the clean prediction per restored cell,
    per noise sample. Column k of `restored` is the restored position `positions[k]` (by
    default every position of the prompt, so column = position)."""

    specs: tuple[tuple[str, int], ...]  # (site, window) per row of `restored`
    restored: Float[Tensor, "spec layer position sample"]
    corrupted: Float[Tensor, " sample"]
    clean_prob: float
    clean_pred_id: int
    noised: tuple[int, ...]
    positions: tuple[int, ...]

    @property
    def indirect_effect(self) -> Float[Tensor, "spec layer position"]:
        """Mean over noise samples of restored - corrupted."""
        return (self.restored - self.corrupted).mean(-1)


def trace_specs(sites: Sequence[str], windows: Sequence[int]) -> tuple[tuple[str, int], ...]:
    """(site, window) pairs: the residual stream at one layer (a window of it would overwrite
    itself), attention and MLP at every window size."""
    bad = [s for s in sites if s not in TRACE_SITES]
    if not sites or bad:
        raise InputError(f"sites must be among {', '.join(TRACE_SITES)}, got {list(sites)}")
    if not windows or any(int(w) < 1 for w in windows):
        raise InputError(f"windows must be >= 1, got {list(windows)}")
    out: list[tuple[str, int]] = []
    for site in sites:
        for w in ((1,) if site == "resid" else sorted(set(int(w) for w in windows))):
            out.append((site, w))
    return tuple(out)


def trace_prompt(
    model: LoadedModel,
    prompt_ids: Sequence[int],
    *,
    noised: Sequence[int],
    noise: Float[Tensor, "sample noised d_model"],
    specs: Sequence[tuple[str, int]],
    positions: Sequence[int] | None = None,
    batch_size: int = 128,
    check: str | None = None,
    reuse_kv: bool = True,
    suffix_ids: Sequence[int] = (),
) -> PromptTrace:
    """Restore every (site, window, layer, position) cell of one prompt under each noise sample.

    `noise` is added at the `noised` positions of the input embeddings. `positions` are the
    restored positions (default: every one; e.g. `key_positions`). `check` (a probe name)
    compares the clean and one noised run with plain full forwards first (`FastPathError`).
    `reuse_kv=False` runs every restored row over the whole prompt (the same numbers, slower: the
    speed benchmark's "before"). A masked LM's `suffix_ids` run after the prompt; its rows run
    whole, every position restorable."""
    n_layers, n_pos = model.n_layers, len(prompt_ids)
    noised = tuple(int(p) for p in noised)
    if not noised or sorted(set(noised)) != list(noised) or noised[0] < 0 or noised[-1] >= n_pos:
        raise InputError(f"noised positions must be sorted, unique and in 0..{n_pos - 1}, got {list(noised)}")
    positions = tuple(range(n_pos)) if positions is None else tuple(int(p) for p in positions)
    if not positions or sorted(set(positions)) != list(positions) or positions[0] < 0 or positions[-1] >= n_pos:
        raise InputError(f"restored positions must be sorted, unique and in 0..{n_pos - 1}, got {list(positions)}")
    if noise.shape[1:] != (len(noised), model.d_model) or noise.shape[0] < 1:
        raise InputError(f"noise must have shape [samples, {len(noised)}, {model.d_model}], got {tuple(noise.shape)}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    valid = valid_mask(model)
    n_samples = int(noise.shape[0])
    needed = sorted({(site, layer) for site, _ in specs for layer in range(n_layers)})
    clean: dict[tuple[str, int], Tensor] = {}

    def keep(key: tuple[str, int]):
        def hook(x: Tensor, hook: Any) -> None:
            clean[key] = x[0].detach().clone()

        return hook

    bidirectional = model.masked
    reuse_kv = reuse_kv and not bidirectional
    runner = SuffixRunner(model, prompt_ids, capture=[(f"blocks.{l}.{HOOKS[s]}", keep((s, l))) for s, l in needed],
                          suffix_ids=suffix_ids)
    clean_logp = mask_logits(runner.clean_logits[None], valid).log_softmax(-1)[0]
    pred = int(clean_logp.argmax())

    def prob_of_pred(logits: Tensor) -> Tensor:
        return mask_logits(logits.float(), valid).log_softmax(-1)[:, pred].exp()

    # The corrupted run of every sample, once: the residual stream entering each block.
    noised_t = torch.tensor(noised)
    x0 = runner.resid[0].expand(n_samples, -1, -1).clone()
    x0[:, noised_t] += noise.to(x0.dtype).to(x0.device)
    entering: list[Tensor] = [torch.empty(0)] * n_layers

    def enter(layer: int):
        def hook(x: Tensor, hook: Any) -> None:
            entering[layer] = x.detach()

        return hook

    recorded = KVRecorder()  # the corrupted runs' keys and values: a restored row reuses them below its position
    corrupted_logits = runner.run(n_samples, [(f"blocks.{l}.hook_resid_pre", enter(l)) for l in range(n_layers)],
                                  start=0, resid=x0, past=recorded)
    if check is not None:
        check_close(runner.run(1, [], start=0)[0], plain_forward(model, prompt_ids, suffix_ids=suffix_ids),
                    what="causal tracing (clean)", probe=check)
        check_close(corrupted_logits[0], plain_forward(model, prompt_ids, noised=noised_t, noise=noise[0],
                                                       suffix_ids=suffix_ids),
                    what="causal tracing (noised, resumed)", probe=check)
    corrupted = prob_of_pred(corrupted_logits)

    # Every restored row: (spec, layer, position, sample), grouped by the layer it resumes at, in
    # batches of cells sorted by restored position. The positions before a batch's first restored
    # position are the corrupted run's (causal attention), so the batch runs the positions from
    # there on only, attending to the corrupted run's keys and values before it (`reuse_kv`).
    # Cells are (spec, layer, column of `restored`, position, restored layers).
    first_pos = 0 if bidirectional else noised[0]  # before it, a causal LM's positions are the corrupted run's
    restored = corrupted.reshape(1, 1, 1, -1).repeat(len(specs), n_layers, len(positions), 1)  # unrun cells: IE 0
    rows_by_start: dict[int, list[tuple[int, int, int, int, tuple[int, ...]]]] = {}
    for si, (_site, window) in enumerate(specs):
        for layer in range(n_layers):
            layers = layer_window(layer, window, n_layers)
            for col, pos in enumerate(positions):
                if pos >= first_pos:
                    rows_by_start.setdefault(layers[0], []).append((si, layer, col, pos, layers))
    reuse_checked = False
    reads: list[tuple[list[tuple[int, int, int, int, tuple[int, ...]]], Tensor]] = []  # unembedded together below
    for start in sorted(rows_by_start):
        cells = sorted(rows_by_start[start], key=lambda cell: cell[3])
        per_batch = max(1, batch_size // n_samples)
        for i in range(0, len(cells), per_batch):
            chunk = cells[i : i + per_batch]
            from_pos = chunk[0][3] if reuse_kv else 0  # the batch's first restored position
            past = None
            if from_pos:
                later = range(start, n_layers)
                past = PrefixKV({l: recorded.keys[l][:, :, :from_pos].repeat(len(chunk), 1, 1, 1) for l in later},
                                {l: recorded.values[l][:, :, :from_pos].repeat(len(chunk), 1, 1, 1) for l in later})
            read = runner.run(len(chunk) * n_samples, _restore_hooks(chunk, specs, clean, n_samples, offset=from_pos),
                              start=start, resid=entering[start][:, from_pos:].repeat(len(chunk), 1, 1),
                              from_pos=from_pos, past=past, unembed=False)
            if check is not None and from_pos and not reuse_checked:  # reused keys and values vs whole-prompt rows
                whole = runner.run(n_samples, _restore_hooks(chunk[:1], specs, clean, n_samples), start=start,
                                   resid=entering[start])
                check_close(runner.logits(read[:n_samples]), whole,
                            what="causal tracing (restored, earlier keys and values reused)", probe=check)
                reuse_checked = True
            reads.append((chunk, read))
    # The restored rows unembedded together, `batch_size` per call: the unembedding streams its
    # 671 MB matrix once per call, whatever the rows (and one batch of logits is in memory at a time).
    if reads:
        rows = torch.cat([read for _, read in reads])
        probs = torch.cat([prob_of_pred(runner.logits(rows[i : i + batch_size], chunk=batch_size))
                           for i in range(0, len(rows), batch_size)])
        cells = [cell for chunk, _ in reads for cell in chunk]
        for (si, layer, col, _, _), p in zip(cells, probs.reshape(len(cells), n_samples)):
            restored[si, layer, col] = p
    return PromptTrace(tuple(specs), restored, corrupted, float(clean_logp[pred].exp()), pred, noised, positions)


def _restore_hooks(
    cells: Sequence[tuple[int, int, int, int, tuple[int, ...]]], specs: Sequence[tuple[str, int]],
    clean: dict[tuple[str, int], Tensor], n_samples: int, *, offset: int = 0,
) -> list[tuple[str, Any]]:
    """Hooks writing the clean activation into rows (cell c, sample s) = row c * n_samples + s, at
    index position - `offset` (a run of the positions from `offset` on)."""
    targets: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for c, (si, _, _, pos, layers) in enumerate(cells):
        for layer in layers:
            targets.setdefault((specs[si][0], layer), []).extend((c * n_samples + s, pos) for s in range(n_samples))
    hooks = []
    for (site, layer), pairs in sorted(targets.items()):
        rows = torch.tensor([r for r, _ in pairs])
        value = clean[(site, layer)][torch.tensor([p for _, p in pairs])]
        pos = torch.tensor([p - offset for _, p in pairs])

        def hook(x: Tensor, hook: Any, rows: Tensor = rows, pos: Tensor = pos, value: Tensor = value) -> Tensor:
            x = x.clone()
            x[rows, pos] = value.to(x.dtype)
            return x

        hooks.append((f"blocks.{layer}.{HOOKS[site]}", hook))
    return hooks


# --------------------------------------------------------------------------------------
# A probe set
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TracingResult(ProbeRowsResult):
    """Causal tracing of a probe set: rows per (probe, site, window, layer, position) with the
    mean restored probability of the clean prediction and its indirect effect; one row per probe
    with the clean and corrupted probabilities and the total effect. Saved like the knockouts
    (`analyses.saved`)."""

    default_name: ClassVar[str] = "tracing"
    CELL: ClassVar[tuple[str, ...]] = ("group", "site", "window", "position", "layer")  # what a summary row is

    def _probe_ie(self) -> pd.Series:
        """IE per (group, site, window, position class, layer, probe): the positions of one class
        averaged within the probe."""
        frame = self.to_dataframe()
        return frame.groupby([*self.CELL, "probe_id"], sort=False)["ie"].mean()

    @staticmethod
    def _sorted(summary: pd.DataFrame) -> pd.DataFrame:
        order = {c: i for i, c in enumerate(POSITION_CLASSES)}
        return summary.sort_values(["group", "site", "window", "position", "layer"],
                                   key=lambda s: s.map(order) if s.name == "position" else s).reset_index(drop=True)

    def summary(self, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """Average indirect effect per set, site, window, layer and position class (positions of a
        class averaged within a probe first), with a 95% percentile-bootstrap interval over probes
        (`aie_low`, `aie_high`), and the median and quartiles of the probes' IE (`aie_median`,
        `aie_q25`, `aie_q75`). Raw IE: compare sets whose total effects differ with
        `restored_share`."""
        columns = ["group", "site", "window", "layer", "position", "n", "aie", "aie_low", "aie_high",
                   "aie_median", "aie_q25", "aie_q75"]
        if self.rows.empty:
            return pd.DataFrame(columns=columns)
        out = []
        for (group, site, window, position), part in self._probe_ie().groupby(level=[0, 1, 2, 3], sort=False):
            table = part.unstack("layer")  # probe x layer
            values = table.to_numpy()
            mean, low, high = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed)
            q25, median, q75 = np.quantile(values, [0.25, 0.5, 0.75], axis=0)
            for j, layer in enumerate(table.columns):
                out.append({"group": group, "site": site, "window": int(window), "layer": int(layer),
                            "position": position, "n": int(table.shape[0]),
                            "aie": float(mean[j]), "aie_low": float(low[j]), "aie_high": float(high[j]),
                            "aie_median": float(median[j]), "aie_q25": float(q25[j]), "aie_q75": float(q75[j])})
        return self._sorted(pd.DataFrame(out, columns=columns))

    def per_probe(self, *, min_total_effect: float = 0.05) -> pd.DataFrame:
        """Every probe's IE (positions of a class averaged), its total effect and IE / TE, per
        (site, window, layer, position class): for plotting distributions. `share` is missing
        where TE <= 0 (no effect to restore); `kept` says whether TE reaches `min_total_effect`,
        the floor `restored_share` applies."""
        _check_floor(min_total_effect)
        columns = ["probe_id", *self.CELL, "ie", "total_effect", "share", "kept"]
        if self.rows.empty:
            return pd.DataFrame(columns=columns)
        frame = self._probe_ie().reset_index()
        frame = frame.merge(self.probes[["probe_id", "group", "total_effect"]], on=["probe_id", "group"], how="left")
        te = frame["total_effect"]
        frame["share"] = (frame["ie"] / te).where(te > 0)
        frame["kept"] = te >= min_total_effect
        return frame[columns]

    def restored_share(self, *, min_total_effect: float = 0.05, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """The share of the total effect restored, per set, site, window, layer and position class:
        `share` = mean IE / mean TE over the probes whose total effect reaches `min_total_effect`
        (a ratio of means: a probe counts by its effect, and a probe with almost no effect cannot
        blow the ratio up), with a 95% percentile-bootstrap interval over probes (`share_low`,
        `share_high`; numerator and denominator resampled together). Positions of one class are
        averaged within a probe first, as in `summary`.

        Columns also give `n` (probes kept), `n_dropped` (probes below the floor), `ie_mean` and
        `te_mean` (the ratio's terms) and `min_total_effect`, which is also in the frame's
        `attrs`. With one probe kept the interval is that probe's ratio; with none, missing."""
        _check_floor(min_total_effect)
        columns = ["group", "site", "window", "layer", "position", "n", "n_dropped", "min_total_effect",
                   "ie_mean", "te_mean", "share", "share_low", "share_high"]
        per_probe = self.per_probe(min_total_effect=min_total_effect)
        out = []
        for (group, site, window, position), part in per_probe.groupby(list(self.CELL[:4]), sort=False):
            table = part.pivot(index="probe_id", columns="layer", values="ie")  # probe x layer
            te = part.groupby("probe_id")["total_effect"].first().reindex(table.index)
            kept = (te >= min_total_effect).to_numpy()
            ie_kept, te_kept = table.to_numpy()[kept], te.to_numpy()[kept]
            n = len(te_kept)
            if n:
                ie_mean, te_mean = ie_kept.mean(axis=0), float(te_kept.mean())
                share = ie_mean / te_mean
            else:
                ie_mean, te_mean, share = np.full(table.shape[1], np.nan), np.nan, np.full(table.shape[1], np.nan)
            if n >= 2:
                low, high = bootstrap((ie_kept, te_kept[:, None]), _ratio_of_means, n_boot=n_boot, rng=seed)
            else:
                low, high = share.copy(), share.copy()
            for j, layer in enumerate(table.columns):
                out.append({"group": group, "site": site, "window": int(window), "layer": int(layer),
                            "position": position, "n": n, "n_dropped": int(len(kept) - n),
                            "min_total_effect": float(min_total_effect), "ie_mean": float(ie_mean[j]),
                            "te_mean": te_mean, "share": float(share[j]), "share_low": float(low[j]),
                            "share_high": float(high[j])})
        share_frame = self._sorted(pd.DataFrame(out, columns=columns))
        share_frame.attrs["min_total_effect"] = float(min_total_effect)
        return share_frame

    def heatmap(self, *, site: str, window: int, group: str | None = None) -> pd.DataFrame:
        """Mean indirect effect, layer x position counted from the end (-1 = the last token)."""
        frame = self.to_dataframe()
        frame = frame[(frame["site"] == site) & (frame["window"] == window)]
        if group is not None:
            frame = frame[frame["group"] == group]
        return frame.pivot_table(index="layer", columns="pos_from_end", values="ie", aggfunc="mean")


def _check_floor(min_total_effect: float) -> None:
    if not min_total_effect > 0:
        raise InputError(f"min_total_effect must be > 0 (a share of a total effect near 0 is undefined), "
                         f"got {min_total_effect}")


def _ratio_of_means(ie: Float[np.ndarray, "boot probe layer"], te: Float[np.ndarray, "boot probe 1"]) -> np.ndarray:
    """Per resample and layer: mean IE / mean TE over the resampled probes."""
    return ie.mean(axis=1) / te.mean(axis=1)


Positions = Literal["all", "key"]
RESTORED_POSITIONS: tuple[str, ...] = ("all", "key")


@dataclass(frozen=True, kw_only=True)
class TracingOptions:
    """What `causal_trace` runs: the restored `sites` (`TRACE_SITES`), the window sizes for mlp and
    attn (resid is one layer), `noise_samples` draws per probe, the noise std as a `multiplier` of
    the input embeddings' std, the noised tokens (`noise_design`, one of `TRACE_DESIGNS`: what each
    tests is in `noise_designs`; or `noise_words` = (first, stop) word indices, which replaces the
    design and is given only with the default design), the restored `positions` ("all", or "key":
    the last noised token and the last token only, see the module docstring) and the noise `seed`.
    Raises `InputError` for a bad value."""

    sites: tuple[str, ...] = TRACE_SITES
    windows: tuple[int, ...] = (1, 10)
    noise_samples: int = 10
    multiplier: float = 3.0
    noise_design: str = "all_but_last"
    noise_words: tuple[int, int] | None = None
    positions: Positions = "all"
    seed: int = 0

    def __post_init__(self) -> None:
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        windows = (self.windows,) if isinstance(self.windows, int) else tuple(int(w) for w in self.windows)
        object.__setattr__(self, "sites", sites)
        object.__setattr__(self, "windows", windows)
        trace_specs(sites, windows)  # InputError for unknown sites or windows below 1
        if self.noise_samples < 1:
            raise InputError(f"noise_samples must be >= 1, got {self.noise_samples}")
        if self.multiplier < 0:
            raise InputError(f"multiplier must be >= 0, got {self.multiplier}")
        check_design(self.noise_design, TRACE_DESIGNS)
        if self.noise_words is not None:
            if len(self.noise_words) != 2:
                raise InputError(f"noise_words must be (first, stop) word indices, got {self.noise_words!r}")
            if self.noise_design != "all_but_last":
                raise InputError(f"give noise_words or noise_design, not both (noise_design {self.noise_design!r}, "
                                 f"noise_words {self.noise_words!r})")
            object.__setattr__(self, "noise_words", (int(self.noise_words[0]), int(self.noise_words[1])))
        if self.positions not in RESTORED_POSITIONS:
            raise InputError(f"positions must be one of {', '.join(RESTORED_POSITIONS)}, got {self.positions!r}")

    def noised_description(self) -> str:
        """What is noised, in words (recorded in the result's settings)."""
        if self.noise_words is not None:
            return f"words {list(self.noise_words)}"
        if self.noise_design == "all_but_last_two":
            return "every prompt word but the last two (words [0, -2])"
        return "every prompt token but the BOS and the last"


def causal_trace(
    model: LoadedModel,
    probes: Sequence[Probe],
    options: TracingOptions = TracingOptions(),
    *,
    scale: NoiseScale | None = None,
    batch_size: int = 128,
    reuse_kv: bool = True,
    progress: bool = False,
) -> TracingResult:
    """Causal tracing of every probe (see the module docstring): per (site, window, layer,
    position), the probability of the clean prediction when that clean activation is restored
    into the noised run, averaged over `options.noise_samples` noise draws.

    `scale` reuses a measured `NoiseScale` (default: `noise_scale(model, multiplier=options.multiplier)`).
    `batch_size` (rows per forward) and `reuse_kv` (False: every restored row over the whole
    prompt, `trace_prompt`) change speed and memory only. Raises `FastPathError` when the fast path
    disagrees with a full forward.
    """
    if not isinstance(options, TracingOptions):
        raise InputError(f"options must be a TracingOptions, got {type(options).__name__}")
    sites, windows, samples = options.sites, options.windows, options.noise_samples
    seed = options.seed
    probes = check_probes(probes)
    specs = trace_specs(sites, windows)
    scale = scale if scale is not None else noise_scale(model, multiplier=options.multiplier)
    started = time.perf_counter()
    decode = model.tokenizer.decode
    frames, probe_rows = [], []
    for i, probe in enumerate(tqdm(probes, desc="causal tracing", unit="probe", disable=not progress)):
        tokens = (split_masked_probe if model.masked else split_probe)(model.tokenizer, probe.prompt, probe.target)
        ids = tokens.prompt_ids
        try:
            noised = noised_span(model.tokenizer, probe.prompt, probe.target, design=options.noise_design,
                                 words=options.noise_words, masked=model.masked)
        except InputError as err:
            raise InputError(f"probe {probe.id!r}: {err}") from None
        positions = key_positions(noised, len(ids)) if options.positions == "key" else None
        noise = trace_noise(probe.id, seed=seed, samples=samples, n_positions=len(noised), d_model=model.d_model,
                            sigma=scale.sigma)
        trace = trace_prompt(model, ids, noised=noised, noise=noise, specs=specs, positions=positions,
                             batch_size=batch_size, check=probe.id if i == 0 else None, reuse_kv=reuse_kv,
                             suffix_ids=tokens.suffix_ids)
        n_spec, n_layers, n_cols = trace.restored.shape[:3]
        s_idx, l_idx, c_idx = np.meshgrid(np.arange(n_spec), np.arange(n_layers), np.arange(n_cols), indexing="ij")
        s_idx, l_idx = s_idx.ravel(), l_idx.ravel()
        p_idx = np.asarray(trace.positions)[c_idx.ravel()]
        n_pos = len(ids)
        classes = [position_class(p, noised, n_pos) for p in range(n_pos)]
        words = [decode([t]) for t in ids]
        corrupted = float(trace.corrupted.mean())
        prob = trace.restored.mean(-1).flatten().numpy().astype(np.float64)
        frames.append(pd.DataFrame({
            "probe_id": probe.id,
            "site": [specs[s][0] for s in s_idx], "window": [specs[s][1] for s in s_idx],
            "layer": l_idx, "pos": p_idx, "pos_from_end": p_idx - n_pos,
            "position": [classes[p] for p in p_idx], "token": [words[p] for p in p_idx],
            "noised": [p in noised for p in p_idx],
            "prob": prob, "ie": prob - corrupted,
        }))
        memorized = trace.clean_pred_id == tokens.target_id
        probe_rows.append({
            "probe_id": probe.id, "kind": probe.kind, "group": probe_group(probe.kind, memorized),
            "memorized": memorized, "prompt": probe.prompt, "target": probe.target,
            "clean_pred_token": decode([trace.clean_pred_id]), "clean_prob": trace.clean_prob,
            "corrupted_prob": corrupted, "corrupted_prob_sd": float(trace.corrupted.std()) if samples > 1 else 0.0,
            "total_effect": trace.clean_prob - corrupted, "n_tokens": len(ids),
            "noised_first": noised[0], "noised_last": noised[-1], "n_noised": len(noised),
        })
    rows = pd.concat(frames, ignore_index=True)
    settings = model.settings() | mask_summary(model) | scale.settings() | {
        "analysis": "causal_tracing", "metric": "probability of the clean prediction (masked softmax)",
        "sites": list(sites), "windows": [int(w) for w in windows], "specs": [list(s) for s in specs],
        "samples": samples, "seed": seed,
        "noise_design": "words" if options.noise_words is not None else options.noise_design,
        "noised": options.noised_description(),
        "restored_positions": (("every position" if model.masked else "every position from the first noised token")
                               if options.positions == "all" else "the last noised token and the last token"),
        "noise_site": "blocks.0.hook_resid_pre (after the embedding scale)",
        "restored_site": {s: HOOKS[s] for s in sites}, "n_probes": len(probes),
        "fast_path": ("restored rows run from the restored position on, the corrupted runs' earlier keys and values "
                      "reused" if reuse_kv and not model.masked else "restored rows run over the whole prompt"),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return TracingResult(rows=rows, probes=pd.DataFrame(probe_rows), settings=settings)

"""MLP neuron knockouts (method.md section 4, after Geva et al. 2022).

An MLP output is a sum of value vectors (rows of W_out) weighted by the neuron activations
(`mlp.hook_post`, the coefficients). Per probe, the neurons of every layer are ranked at the last
prompt position of the clean pass, and a configuration zeroes the top-k neurons of every layer in
a window of consecutive layers (``zero_top``) or every neuron but the top-k (``keep_top``).

Ranking (``rank_by``):
- ``effective`` (default): the norm of the neuron's actual contribution to the residual stream,
  |activation| x ||value vector * g|| / s, where g is the gain of the norm applied to the MLP's
  output (Gemma's ``ln2_post``, an RMSNorm: y = m / s * g) and s the RMS of the clean MLP output
  m at that position. Without a post-MLP norm (GPT-2, Llama) it is |activation| x ||value vector||.
- ``magnitude``: |activation| x ||W_out row||, the authors' formula taken literally.
- ``dla``: activation x (value vector * g / s) . W_U[:, prediction] (final norm ignored: approximate).

Positions (``positions``): ``all`` (default, the authors' way: their hook sits on the MLP's first
linear layer and acts on the whole sequence) zeroes the chosen neurons at every prompt position;
``last`` (our variant) at the last prompt position only. The neurons are always those of the
clean pass at the last position.

Norm handling (``norm``): ``live`` (default) lets the post-MLP norm renormalise the knocked-out
MLP output (which partly undoes a zeroing: the remaining output is scaled back up); ``frozen``
fixes the norm's scale s at its clean-pass value in the knocked-out layers, so the MLP block's
output becomes (m - removed) * g / s_clean: zeroing removes exactly the neurons' contributions
(the standard "frozen LayerNorm scale"). Identical on models without a post-MLP norm.

Controls (``controls``, the `control` column):
- ``random``: the same number of neurons drawn uniformly (seeded per probe, layer and k);
- ``matched`` (zero_top only): random neurons from outside the top-k whose summed effective score
  matches the top-k's: neurons in a seeded random order (per probe, layer and k), the shortest
  prefix whose sum reaches the top-k's sum, minus its last neuron when that lands closer. When
  the top-k carry more than everything else (large k: activations are heavy-tailed), the match
  falls short (the set is then every other neuron):
  every row reports ``score_ratio`` (the set's summed score / the top-k's, over the window) and
  ``zeroed_share`` (the zeroed neurons' share of the window's summed score) so no reader has to
  trust the name. (For keep_top, a set of the top-k's magnitude drawn outside the top-k would be
  the complement that keep_top already zeroes, so keep_top has the random control only.)
- ``whole_mlp``: every neuron of the window's layers (k = d_mlp), one per window: the ceiling.

Speed: ``positions="last"`` reuses each probe's prefix key/value cache (`PromptRunner`): one token
per configuration. ``positions="all"`` runs whole prompts, resumed at the window's first layer
from the clean residual stream (`SuffixRunner`): the layers below the window are untouched by the
knockout and run once per probe. Configurations of a probe are the rows of a batch. Both paths
are checked against a plain full forward before anything is written and tested against
hand-written full forwards (tests/interventions/test_against_full_forward.py).

Metrics per configuration (on real vocabulary tokens only, `idiom_lens.models.vocab`): whether the
prediction changed, the drop of the clean prediction's probability, whether the new prediction is
the target. Summaries give per set the share changed with n and a 95% Wilson interval.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from idiom_lens.analyses.memorization import probe_group
from idiom_lens.analyses.saved import ProbeRowsResult
from idiom_lens.analyses.stats import wilson_interval
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.selection import check_probes
from idiom_lens.errors import InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.runners import PromptRunner, SuffixRunner, last_metrics, masked_prediction
from idiom_lens.models.vocab import mask_summary, valid_mask
from idiom_lens.types import HookFn

RankBy = Literal["effective", "magnitude", "dla"]
Positions = Literal["all", "last"]
NormHandling = Literal["live", "frozen"]

MODES: tuple[str, ...] = ("zero_top", "keep_top")
CONTROLS: tuple[str, ...] = ("random", "matched", "whole_mlp")  # besides "targeted"
RANKINGS: tuple[str, ...] = ("effective", "magnitude", "dla")
POSITIONS: tuple[str, ...] = ("all", "last")
NORMS: tuple[str, ...] = ("live", "frozen")



@dataclass(frozen=True, kw_only=True)
class KnockoutGrid:
    """Which (mode, k, window length) a knockout sweep holds; every start layer of every window length.

    zero_top: every k in `ks` in windows of `windows` layers; keep_top: every k in `keep_top_ks`
    (None: `ks`) in windows of `keep_top_windows` (None: `windows`). Class-level grids: `DEFAULT`
    (ours), `PAPER` (the authors') and `STUDY` (what `idiom-lens run` uses). Raises `InputError`
    for an empty or negative entry or an unknown mode.
    """

    # Ours: zero_top for k in 1, 10, 100, 1000 in windows of 1-5 layers; keep_top for k = 100 in windows
    # of 1-3 (keep_top with small k in a long window ablates whole MLPs and says little).
    ks: tuple[int, ...] = (1, 10, 100, 1000)
    windows: tuple[int, ...] = (1, 2, 3, 4, 5)
    modes: tuple[str, ...] = ("zero_top", "keep_top")
    keep_top_ks: tuple[int, ...] | None = (100,)
    keep_top_windows: tuple[int, ...] | None = (1, 2, 3)

    DEFAULT: ClassVar[KnockoutGrid]
    PAPER: ClassVar[KnockoutGrid]
    STUDY: ClassVar[KnockoutGrid]

    def __post_init__(self) -> None:
        for name in ("ks", "windows", "keep_top_ks", "keep_top_windows"):
            value = getattr(self, name)
            if value is None and name.startswith("keep_top"):
                continue
            if value is None or isinstance(value, (str, int)) or not value:
                raise InputError(f"{name} must be a non-empty sequence of whole numbers, got {value!r}")
            value = tuple(int(v) for v in value)
            low = 1 if "windows" in name else 0
            if any(v < low for v in value):
                raise InputError(f"{name} must be whole numbers >= {low}, got {list(value)}")
            object.__setattr__(self, name, value)
        modes = (self.modes,) if isinstance(self.modes, str) else tuple(self.modes)
        if not modes or any(m not in MODES for m in modes):
            raise InputError(f"modes must be among {', '.join(MODES)}, got {list(modes)}")
        object.__setattr__(self, "modes", modes)

    def clipped(self, n_layers: int) -> KnockoutGrid:
        """This grid without the window lengths a model of `n_layers` layers cannot hold (for the
        class-level grids, written for deep models; `knockout_grid` clips those and no other)."""
        def clip(windows: tuple[int, ...] | None) -> tuple[int, ...] | None:
            return None if windows is None else tuple(w for w in windows if w <= n_layers)

        return dataclasses.replace(self, windows=clip(self.windows), keep_top_windows=clip(self.keep_top_windows))

    def describe(self) -> dict[str, Any]:
        """The grid as plain lists (settings)."""
        return {"ks": list(self.ks), "windows": list(self.windows), "modes": list(self.modes),
                "keep_top_ks": None if self.keep_top_ks is None else list(self.keep_top_ks),
                "keep_top_windows": None if self.keep_top_windows is None else list(self.keep_top_windows)}


KnockoutGrid.DEFAULT = KnockoutGrid()
# The paper's full grid (the authors' knockouts.py): top-k for k in 1, 10, 100, 1000 in windows of 1-5 layers,
# all-but-top-k for k in 10, 100, 1000 in windows of 1-3 layers.
KnockoutGrid.PAPER = KnockoutGrid(ks=(1, 10, 100, 1000), windows=(1, 2, 3, 4, 5), modes=MODES,
                                  keep_top_ks=(10, 100, 1000), keep_top_windows=(1, 2, 3))
# The study's (`idiom-lens run`): k = 100 in windows of one layer, zero_top only (4 x 18 configurations per
# probe on Gemma 3 270M with the three controls).
KnockoutGrid.STUDY = KnockoutGrid(ks=(100,), windows=(1,), modes=("zero_top",), keep_top_ks=None,
                                  keep_top_windows=None)


@dataclass(frozen=True, kw_only=True)
class KnockoutOptions:
    """What `knockout_grid` runs (see the module docstring for each option): the `grid`, the
    `controls` beside each targeted configuration (() for none), the neuron ranking, the positions
    knocked out, the post-MLP norm handling and the `seed` of the random controls. Raises
    `InputError` for an unknown value."""

    grid: KnockoutGrid = KnockoutGrid.DEFAULT
    controls: tuple[str, ...] = CONTROLS
    rank_by: RankBy = "effective"
    positions: Positions = "all"
    norm: NormHandling = "live"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.grid, KnockoutGrid):
            raise InputError(f"grid must be a KnockoutGrid, got {self.grid!r}")
        controls = (self.controls,) if isinstance(self.controls, str) else tuple(self.controls)
        bad = [c for c in controls if c not in CONTROLS]
        if bad:
            raise InputError(f"controls must be among {', '.join(CONTROLS)}, got {list(controls)}")
        object.__setattr__(self, "controls", controls)
        if self.rank_by not in RANKINGS:
            raise InputError(f"rank_by must be one of {', '.join(RANKINGS)}, got {self.rank_by!r}")
        if self.positions not in POSITIONS:
            raise InputError(f"positions must be 'all' or 'last', got {self.positions!r}")
        if self.norm not in NORMS:
            raise InputError(f"norm must be 'live' or 'frozen', got {self.norm!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise InputError(f"seed must be a whole number, got {self.seed!r}")


def _stable_seed(*parts: object) -> int:
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# --------------------------------------------------------------------------------------
# Neuron ranking
# --------------------------------------------------------------------------------------


def value_vector_norms(model: LoadedModel) -> Float[Tensor, "layer d_mlp"]:
    """||W_out row|| of every neuron of every layer."""
    with torch.no_grad():
        return model.bridge.W_out.float().norm(dim=-1)


def rms_gain(norm: Any, model: LoadedModel, *, what: str) -> Float[Tensor, " d_model"]:
    """The per-feature gain g of an RMS-type norm module (y = x / s(x) * g), read off the module
    itself: a large constant input (s = its value) gives g; a random input checks that the module
    is a per-feature gain times one scale per position (else `InputError`)."""
    with torch.no_grad():
        g = norm(torch.full((1, 1, model.d_model), 1e3, device=model.device)).float().flatten()
        x = torch.randn(1, 1, model.d_model, generator=torch.Generator().manual_seed(0)).to(model.device)
        y = norm(x).float().flatten()
        expected = x.flatten() * g
        expected = expected * (y.norm() / expected.norm())
    if float((y - expected).abs().max()) > 1e-4 * float(y.abs().max()):
        raise InputError(
            f"the {what} is not a per-feature gain times one scale (an RMSNorm): the effective ranking, "
            "the frozen norm and effective value vectors need one; use rank_by='magnitude', norm='live'"
        )
    return g


_GAINS: weakref.WeakKeyDictionary[object, Tensor | None] = weakref.WeakKeyDictionary()


def post_norm_gains(model: LoadedModel) -> Float[Tensor, "layer d_model"] | None:
    """The gain g of the norm applied to each MLP's output (`ln2_post`, Gemma's RMSNorm y = m / s * g,
    g = 1 + weight), read off the modules (`rms_gain`); None for models without one (GPT-2, Llama)."""
    bridge = model.bridge
    if bridge not in _GAINS:
        blocks = list(bridge.blocks)
        if all(hasattr(b, "ln2_post") for b in blocks):
            _GAINS[bridge] = torch.stack([rms_gain(b.ln2_post, model, what=f"layer {i}'s post-MLP norm")
                                          for i, b in enumerate(blocks)])
        else:
            _GAINS[bridge] = None
    return _GAINS[bridge]


def effective_value_norms(model: LoadedModel) -> Float[Tensor, "layer d_mlp"]:
    """||W_out row * g|| per neuron (the post-MLP norm's gain g; plain ||W_out row|| without one)."""
    gains = post_norm_gains(model)
    with torch.no_grad():
        w_out = model.bridge.W_out.float()
        return (w_out if gains is None else w_out * gains[:, None, :]).norm(dim=-1)


def neuron_scores(
    activations: Float[Tensor, "layer d_mlp"],
    model: LoadedModel,
    *,
    by: RankBy = "effective",
    pred_id: int | None = None,
    scale: Float[Tensor, " layer"] | None = None,
    norms: Float[Tensor, "layer d_mlp"] | None = None,
) -> Float[Tensor, "layer d_mlp"]:
    """Importance of every neuron at one position; higher = knocked out first.

    ``effective``: |activation| x ||value vector * g|| / s (s = `scale`, the post-norm's clean RMS per
    layer at that position; 1 without a post norm). ``magnitude``: |activation| x ||W_out row||.
    ``dla``: activation x (value vector * g / s) . W_U[:, pred] (final norm ignored: approximate).
    `norms` may pass precomputed `effective_value_norms` (effective) or `value_vector_norms` (magnitude).
    """
    scale = torch.ones(activations.shape[0]) if scale is None else scale.float()
    if by == "magnitude":
        norms = value_vector_norms(model) if norms is None else norms
        return activations.abs() * norms
    if by == "effective":
        norms = effective_value_norms(model) if norms is None else norms
        return activations.abs() * norms / scale[:, None]
    if by == "dla":
        if pred_id is None:
            raise InputError("rank_by='dla' needs the predicted token id")
        gains = post_norm_gains(model)
        with torch.no_grad():
            w_out = model.bridge.W_out.float()
            if gains is not None:
                w_out = w_out * gains[:, None, :]
            push = w_out @ model.bridge.W_U[:, pred_id].float()  # [layer, d_mlp]
        return activations * push / scale[:, None]
    raise InputError(f"rank_by must be one of {', '.join(RANKINGS)}, got {by!r}")


@dataclass(frozen=True)
class _CleanState:
    """One probe's clean pass: the runner to replay it, the last-position activations, the post-norm
    scale (RMS of the MLP output) per layer at every position of a run, and the prediction."""

    runner: PromptRunner | SuffixRunner
    activations: Float[Tensor, "layer d_mlp"]
    scale: Float[Tensor, "layer pos"]  # positions of the runner's rows (1 with a prefix cache)
    pred_id: int
    pred_prob: float

    @property
    def last_scale(self) -> Float[Tensor, " layer"]:
        return self.scale[:, self.runner.last]


def _clean_state(model: LoadedModel, prompt_ids: Sequence[int], *, positions: Positions) -> _CleanState:
    """One clean run: activations at the last prompt position, post-norm scales, masked prediction."""
    n_layers = model.n_layers
    gains = post_norm_gains(model)
    acts: dict[int, Tensor] = {}
    norm_in: dict[int, Tensor] = {}
    scale: dict[int, Tensor] = {}

    def capture_act(layer: int) -> HookFn:
        def hook(x: Tensor, hook: Any) -> None:
            acts[layer] = x[0, -1].detach().float().clone()

        return hook

    def capture_in(layer: int) -> HookFn:
        def hook(x: Tensor, hook: Any) -> None:
            norm_in[layer] = x[0].detach().float().clone()

        return hook

    def capture_out(layer: int) -> HookFn:
        def hook(y: Tensor, hook: Any) -> None:  # s = ||m * g|| / ||y|| per position
            m = norm_in[layer]
            scale[layer] = (m * gains[layer]).norm(dim=-1) / y[0].detach().float().norm(dim=-1)

        return hook

    hooks = [(f"blocks.{i}.mlp.hook_post", capture_act(i)) for i in range(n_layers)]
    if gains is not None:
        hooks += [(f"blocks.{i}.ln2_post.hook_in", capture_in(i)) for i in range(n_layers)]
        hooks += [(f"blocks.{i}.ln2_post.hook_out", capture_out(i)) for i in range(n_layers)]
    if positions == "all":
        runner: PromptRunner | SuffixRunner = SuffixRunner(model, prompt_ids, capture=hooks)
        logits = runner.clean_logits
    else:
        runner = PromptRunner(model, prompt_ids, use_kv=True)
        logits = runner.run(1, hooks)[0]
    pred, prob = masked_prediction(logits, valid_mask(model))
    activations = torch.stack([acts[i] for i in range(n_layers)])
    if gains is None:
        scales = torch.ones(n_layers, runner.n_pos)
    else:
        scales = torch.stack([scale[i] for i in range(n_layers)])
    return _CleanState(runner, activations, scales, pred, prob)


@dataclass(frozen=True)
class NeuronRanking:
    """Per probe, the neuron activations and scores at the last prompt position."""

    probe_ids: tuple[str, ...]
    rank_by: str
    activations: Float[Tensor, "probe layer d_mlp"]
    scores: Float[Tensor, "probe layer d_mlp"]
    pred_ids: tuple[int, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def top(self, k: int) -> Int[Tensor, "probe layer k"]:
        """Indices of the k highest-scoring neurons of every layer (ties: lower index first)."""
        order = self.scores.argsort(dim=-1, descending=True, stable=True)
        return order[..., : min(k, self.scores.shape[-1])]

    def to_dataframe(self, *, k: int = 10) -> pd.DataFrame:
        """The top-k neurons of every layer per probe (long format)."""
        top = self.top(k)
        rows = []
        for p, pid in enumerate(self.probe_ids):
            for layer in range(top.shape[1]):
                for rank, n in enumerate(top[p, layer].tolist()):
                    rows.append({
                        "probe_id": pid, "layer": layer, "rank": rank, "neuron": n,
                        "activation": float(self.activations[p, layer, n]),
                        "score": float(self.scores[p, layer, n]),
                    })
        return pd.DataFrame(rows)


def rank_neurons(
    model: LoadedModel, probes: Sequence[Probe], *, rank_by: RankBy = "effective", progress: bool = False
) -> NeuronRanking:
    """Rank every MLP neuron of every layer per probe at the last prompt position (clean pass)."""
    probes = check_probes(probes)
    if rank_by not in RANKINGS:
        raise InputError(f"rank_by must be one of {', '.join(RANKINGS)}, got {rank_by!r}")
    norms = effective_value_norms(model) if rank_by == "effective" else value_vector_norms(model)
    acts, scores, preds = [], [], []
    probe_tokens = tokenize_probes(model, probes)
    PromptRunner(model, probe_tokens[0].prompt_ids, use_kv=True).self_check(what="neuron ranking", probe=probes[0].id)
    for toks in tqdm(probe_tokens, desc="rank neurons", disable=not progress):
        state = _clean_state(model, toks.prompt_ids, positions="last")
        acts.append(state.activations)
        scores.append(neuron_scores(state.activations, model, by=rank_by, pred_id=state.pred_id,
                                    scale=state.last_scale, norms=norms if rank_by != "dla" else None))
        preds.append(state.pred_id)
    return NeuronRanking(
        tuple(p.id for p in probes), rank_by, torch.stack(acts), torch.stack(scores), tuple(preds),
        settings=model.settings() | mask_summary(model) | {"rank_by": rank_by},
    )


# --------------------------------------------------------------------------------------
# The knockout grid
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KnockoutCell:
    """One intervention: which neurons (mode, control, k) in which layers (start..end)."""

    mode: str  # zero_top | keep_top
    control: str  # targeted | random | matched | whole_mlp
    k: int
    start: int
    end: int  # inclusive

    @property
    def layers(self) -> range:
        return range(self.start, self.end + 1)


def _check_windows(windows: Sequence[int], n_layers: int, what: str) -> None:
    if not windows or any(int(w) < 1 or int(w) > n_layers for w in windows):
        raise InputError(f"{what} window lengths must be in 1..{n_layers}, got {list(windows)}")


def knockout_cells(
    n_layers: int,
    grid: KnockoutGrid = KnockoutGrid.DEFAULT,
    *,
    controls: Sequence[str] = CONTROLS,
    d_mlp: int | None = None,
) -> list[KnockoutCell]:
    """Every cell of `grid`: windows of each length at every start layer.

    Each targeted cell comes with its `controls` (random for both modes, matched for zero_top),
    and ``whole_mlp`` adds one cell per window (k = `d_mlp`). Raises `InputError` for a window
    longer than the model or an unknown control.
    """
    ks, windows, modes = grid.ks, grid.windows, grid.modes
    bad = [c for c in controls if c not in CONTROLS]
    if bad:
        raise InputError(f"controls must be among {', '.join(CONTROLS)}, got {list(controls)}")
    if "whole_mlp" in controls and not d_mlp:
        raise InputError("the whole_mlp control needs d_mlp")
    keep_top_ks = ks if grid.keep_top_ks is None else grid.keep_top_ks
    keep_top_windows = windows if grid.keep_top_windows is None else grid.keep_top_windows
    _check_windows(windows, n_layers, "zero_top")
    if "keep_top" in modes:
        _check_windows(keep_top_windows, n_layers, "keep_top")
    out: list[KnockoutCell] = []
    all_windows: set[int] = set()
    for mode in modes:
        mode_ks = ks if mode == "zero_top" else keep_top_ks
        mode_windows = windows if mode == "zero_top" else keep_top_windows
        mode_controls = ["targeted"] + [c for c in controls if c == "random" or (c == "matched" and mode == "zero_top")]
        all_windows |= {int(w) for w in mode_windows}
        for k in sorted(dict.fromkeys(int(k) for k in mode_ks)):
            for w in sorted(set(int(w) for w in mode_windows)):
                for start in range(n_layers - w + 1):
                    for c in mode_controls:
                        out.append(KnockoutCell(mode, c, k, start, start + w - 1))
    if "whole_mlp" in controls:
        for w in sorted(all_windows):
            for start in range(n_layers - w + 1):
                out.append(KnockoutCell("zero_top", "whole_mlp", int(d_mlp), start, start + w - 1))
    return out


def wilson_columns(successes: np.ndarray, n: np.ndarray, *, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper Wilson bounds of a share (`stats.wilson_interval`), as two arrays."""
    low, high = wilson_interval(np.asarray(successes), np.asarray(n), level=level)
    return np.asarray(low), np.asarray(high)


SUMMARY_KEYS = ["group", "positions", "rank_by", "norm", "mode", "control", "k", "start", "end", "window"]


@dataclass(frozen=True)
class KnockoutResult(ProbeRowsResult):
    """Per probe x configuration outcome of the knockout grid, with per-probe clean facts.

    `rows`: one row per (probe, configuration); `probes`: one row per probe (id, kind, group,
    clean prediction, target). `to_dataframe`, `save` and `load` come from `ProbeRowsResult`:
    `knockouts.parquet`, `knockouts_probes.parquet`, `knockouts_summary.parquet` and the descriptor.
    """

    default_name = "knockouts"

    def summary(self, *, level: float = 0.95) -> pd.DataFrame:
        """Per set and configuration: n, share changed with its Wilson interval (`level`), mean
        probability drop, share on target, mean zeroed share of the score and score ratio."""
        frame = self.to_dataframe()
        out = (
            frame.groupby(SUMMARY_KEYS, sort=True)
            .agg(n=("probe_id", "size"), n_changed=("changed", "sum"), changed=("changed", "mean"),
                 prob_drop=("prob_drop", "mean"), new_is_target=("new_is_target", "mean"),
                 zeroed_share=("zeroed_share", "mean"), score_ratio=("score_ratio", "mean"))
            .reset_index()
        )
        out["changed_low"], out["changed_high"] = wilson_columns(out["n_changed"].to_numpy(), out["n"].to_numpy(),
                                                                 level=level)
        return out

    def layer_table(self, *, k: int = 100, window: int = 1, mode: str = "zero_top") -> pd.DataFrame:
        """Share changed per set x control x layer for one k and window length (the whole-MLP
        ceiling of the same window included), with n and 95% intervals: the specificity table."""
        s = self.summary()
        s = s[(s["window"] == window) & (((s["mode"] == mode) & (s["k"] == k)) | (s["control"] == "whole_mlp"))]
        if s.empty:
            raise InputError(f"no knockout results for k={k}, window={window}, mode={mode!r}")
        cols = ["group", "positions", "rank_by", "norm", "control", "start", "n", "changed", "changed_low",
                "changed_high", "prob_drop", "zeroed_share", "score_ratio"]
        return s[cols].rename(columns={"start": "layer"}).reset_index(drop=True)

    @staticmethod
    def stack_runs(results: Sequence[KnockoutResult]) -> KnockoutResult:
        """Several runs on the same probes under other settings (e.g. positions all and last) as one
        result, their settings under "runs" (parts of one run: `join_parts`)."""
        if not results:
            raise InputError("nothing to concatenate")
        probes = pd.concat([r.probes for r in results], ignore_index=True).drop_duplicates("probe_id")
        return KnockoutResult(rows=pd.concat([r.rows for r in results], ignore_index=True), probes=probes,
                              settings={"runs": [r.settings for r in results]})


def random_neurons(*, probe_id: str, layer: int, k: int, d_mlp: int, seed: int) -> Int[Tensor, " k"]:
    """The random control's k neurons of one layer for one probe: a seeded draw that depends only
    on (seed, probe id, layer, k), so that it is the same in every run, batch and window."""
    gen = torch.Generator().manual_seed(_stable_seed(seed, probe_id, layer, k))
    return torch.randperm(d_mlp, generator=gen)[:k]


def matched_neurons(
    scores: Float[Tensor, " d_mlp"], top: Int[Tensor, " k"], *, probe_id: str, layer: int, k: int, seed: int,
) -> Int[Tensor, " n"]:
    """The magnitude-matched control of one layer for one probe: neurons outside `top` in a seeded
    random order (per seed, probe id, layer, k), the shortest prefix whose summed score reaches the
    top's summed score, minus its last neuron when the sum without it is closer; every neuron
    outside `top` when even their total falls short."""
    d_mlp = scores.shape[0]
    outside = torch.ones(d_mlp, dtype=torch.bool)
    outside[top] = False
    gen = torch.Generator().manual_seed(_stable_seed(seed, probe_id, layer, k, "matched"))
    order = torch.randperm(d_mlp, generator=gen)
    order = order[outside[order]]
    if len(top) == 0 or len(order) == 0:
        return order[:0]
    goal = float(scores[top].double().sum())
    cumulative = scores[order].double().cumsum(0)
    reached = int(torch.searchsorted(cumulative, torch.tensor([goal], dtype=torch.float64))[0])
    if reached >= len(order):
        return order
    n = reached + 1
    below = float(cumulative[reached - 1]) if reached > 0 else 0.0
    if reached > 0 and goal - below < float(cumulative[reached]) - goal:
        n = reached
    return order[:n]


@dataclass
class _ProbeNeurons:
    """Per probe: which neurons each control picks in each layer (cached), and their scores."""

    order: Int[Tensor, "layer d_mlp"]  # the ranking, best first
    effective: Float[Tensor, "layer d_mlp"]  # effective scores (for matching and shares)
    probe_id: str
    seed: int
    cache: dict = field(default_factory=dict)

    @property
    def d_mlp(self) -> int:
        return int(self.order.shape[1])

    def chosen(self, control: str, layer: int, k: int) -> Tensor:
        """The set that stands in for the top-k in this layer (kept by keep_top, zeroed by zero_top)."""
        k = min(k, self.d_mlp)
        if control in ("targeted", "whole_mlp"):
            return self.order[layer, :k] if control == "targeted" else self.order[layer]
        key = (control, layer, k)
        if key not in self.cache:
            if control == "random":
                self.cache[key] = random_neurons(probe_id=self.probe_id, layer=layer, k=k, d_mlp=self.d_mlp,
                                                 seed=self.seed)
            elif control == "matched":
                self.cache[key] = matched_neurons(self.effective[layer], self.order[layer, :k],
                                                  probe_id=self.probe_id, layer=layer, k=k, seed=self.seed)
            else:
                raise InputError(f"unknown control {control!r}")
        return self.cache[key]

    def zero_mask(self, config: KnockoutCell, layer: int) -> Bool[Tensor, " d_mlp"]:
        """True for the neurons the configuration zeroes in `layer`."""
        chosen = self.chosen(config.control, layer, config.k)
        mask = torch.zeros(self.d_mlp, dtype=torch.bool)
        mask[chosen] = True
        return mask if config.mode == "zero_top" or config.control == "whole_mlp" else ~mask

    def config_stats(self, config: KnockoutCell) -> tuple[int, float, float]:
        """(neurons zeroed, their share of the window's summed effective score, summed score of the
        set standing in for the top-k / the top-k's summed score), over the window's layers."""
        zeroed, zeroed_score, total, chosen_score, top_score = 0, 0.0, 0.0, 0.0, 0.0
        for layer in config.layers:
            eff = self.effective[layer].double()
            mask = self.zero_mask(config, layer)
            zeroed += int(mask.sum())
            zeroed_score += float(eff[mask].sum())
            total += float(eff.sum())
            chosen_score += float(eff[self.chosen(config.control, layer, config.k)].sum())
            top_score += float(eff[self.chosen("targeted" if config.control != "whole_mlp" else "whole_mlp",
                                               layer, config.k)].sum())
        share = zeroed_score / total if total > 0 else float("nan")
        ratio = chosen_score / top_score if top_score > 0 else float("nan")
        return zeroed, share, ratio


def knockout_hooks(
    configs: Sequence[KnockoutCell],
    neurons: _ProbeNeurons,
    *,
    positions: Positions,
    last: int,
    n_pos: int,
    frozen: tuple[Float[Tensor, "layer d_model"], Float[Tensor, "layer pos"]] | None = None,
) -> list[tuple[str, HookFn]]:
    """Hooks applying configuration r to row r of a batch (rows untouched elsewhere).

    `mlp.hook_post` is multiplied by a 0/1 mask per row and layer at the chosen positions. With
    `frozen` = (gains g, clean scales s per layer and run position), the post-MLP norm's output of
    the touched rows and layers becomes its input * g / s_clean at those positions."""
    n_layers = neurons.order.shape[0]
    d_mlp = neurons.d_mlp
    masks = torch.ones(len(configs), n_layers, d_mlp)  # multiplicative 0/1 mask per row and layer
    touched = torch.zeros(len(configs), n_layers, dtype=torch.bool)
    for r, cfg in enumerate(configs):
        for layer in cfg.layers:
            zero = neurons.zero_mask(cfg, layer)
            if not zero.any():
                continue
            masks[r, layer, zero] = 0.0
            touched[r, layer] = True
    pos = slice(last, last + 1) if positions == "last" else slice(0, n_pos)
    hooks: list[tuple[str, HookFn]] = []
    for layer in range(n_layers):
        rows = touched[:, layer].nonzero().flatten()
        if len(rows) == 0:
            continue

        def zero_hook(x: Tensor, hook: Any, rows: Tensor = rows, layer: int = layer) -> Tensor:
            x = x.clone()
            x[rows, pos] = x[rows, pos] * masks[rows, layer].to(x.device, x.dtype)[:, None, :]
            return x

        hooks.append((f"blocks.{layer}.mlp.hook_post", zero_hook))
        if frozen is not None:
            gains, scales = frozen
            stored: dict[str, Tensor] = {}

            def keep_input(x: Tensor, hook: Any, rows: Tensor = rows, stored: dict = stored) -> None:
                stored["x"] = x[rows, pos].clone()

            def frozen_output(y: Tensor, hook: Any, layer: int = layer, rows: Tensor = rows,
                              stored: dict = stored, gains: Tensor = gains, scales: Tensor = scales) -> Tensor:
                y = y.clone()
                s = scales[layer, pos].to(y.device, torch.float32)[None, :, None]
                y[rows, pos] = (stored.pop("x").float() * gains[layer].to(y.device) / s).to(y.dtype)
                return y

            hooks += [(f"blocks.{layer}.ln2_post.hook_in", keep_input),
                      (f"blocks.{layer}.ln2_post.hook_out", frozen_output)]
    return hooks


def _probe_rows(
    model: LoadedModel,
    state: _CleanState,
    configs: Sequence[KnockoutCell],
    neurons: _ProbeNeurons,
    options: KnockoutOptions,
    *,
    target_id: int,
    batch_size: int,
) -> dict[str, np.ndarray]:
    """Run the cells of one probe as rows of batches; metrics per cell (in order), knocked out at
    `options.positions` with `options.norm`.

    With whole prompts (`SuffixRunner`) a batch holds cells of one start layer and resumes there."""
    runner = state.runner
    valid = valid_mask(model)
    gains = post_norm_gains(model)
    frozen = (gains, state.scale) if options.norm == "frozen" and gains is not None else None
    if isinstance(runner, SuffixRunner):
        groups: dict[int, list[int]] = {}
        for i, cfg in enumerate(configs):
            groups.setdefault(cfg.start, []).append(i)
    else:
        groups = {0: list(range(len(configs)))}
    results: dict[str, np.ndarray] = {}
    for start, index in groups.items():
        for b in range(0, len(index), batch_size):
            chunk = index[b : b + batch_size]
            hooks = knockout_hooks([configs[i] for i in chunk], neurons, positions=options.positions, last=runner.last,
                                   n_pos=runner.n_pos, frozen=frozen)
            if isinstance(runner, SuffixRunner):
                logits = runner.run(len(chunk), hooks, start=start)
            else:
                logits = runner.run(len(chunk), hooks)
            metrics = last_metrics(logits, state.pred_id, state.pred_prob, target_id, valid=valid)
            for key, values in metrics.items():
                if key not in results:
                    results[key] = np.empty(len(configs), dtype=values.dtype)
                results[key][chunk] = values
    return results


def _fitted(grid: KnockoutGrid, n_layers: int) -> KnockoutGrid:
    """`grid` with its class-level windows (`DEFAULT`'s and `PAPER`'s 1-5 and keep_top 1-3, written
    for deep models) clipped to the model's depth; other windows are left for `knockout_cells` to
    reject when they do not fit."""
    stock = KnockoutGrid.DEFAULT
    clip = stock.clipped(n_layers)
    return dataclasses.replace(
        grid,
        windows=clip.windows if grid.windows == stock.windows else grid.windows,
        keep_top_windows=clip.keep_top_windows if grid.keep_top_windows == stock.keep_top_windows
        else grid.keep_top_windows,
    )


def knockout_grid(
    model: LoadedModel,
    probes: Sequence[Probe],
    options: KnockoutOptions = KnockoutOptions(),
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> KnockoutResult:
    """Knock out top-k (or all but top-k) MLP neurons in every layer window, per probe.

    `options` (`KnockoutOptions`): the grid (`KnockoutGrid.DEFAULT`, `.PAPER`, `.STUDY` or your
    own; the class-level grids are clipped to the model's depth, any other must fit), the
    controls, `rank_by`, `positions`, `norm` (see the module docstring) and the controls' seed.
    The clean run of each probe is computed once and reused by all its cells, which run as rows
    of batches of `batch_size` (speed and memory only).

    Raises `InputError` for a window longer than the model or a batch size below 1;
    `FastPathError` when its fast path disagrees with a full forward (checked before any row is
    kept).
    """
    probes = check_probes(probes)
    if not isinstance(options, KnockoutOptions):
        raise InputError(f"options must be a KnockoutOptions, got {type(options).__name__}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    grid = _fitted(options.grid, model.n_layers)
    controls, rank_by, positions = options.controls, options.rank_by, options.positions
    d_mlp = int(model.bridge.cfg.d_mlp)
    configs = knockout_cells(model.n_layers, grid, controls=controls, d_mlp=d_mlp)
    probe_tokens = tokenize_probes(model, probes)
    eff_norms = effective_value_norms(model)
    rank_norms = value_vector_norms(model) if rank_by == "magnitude" else eff_norms
    cfg_frame = pd.DataFrame({
        "positions": positions, "rank_by": rank_by, "norm": options.norm,
        "mode": [c.mode for c in configs], "control": [c.control for c in configs],
        "k": [c.k for c in configs], "start": [c.start for c in configs], "end": [c.end for c in configs],
    })
    cfg_frame["window"] = cfg_frame["end"] - cfg_frame["start"] + 1
    # the shortcuts under the installed versions, against a plain full forward (before any output)
    first = probe_tokens[0].prompt_ids
    if positions == "all":
        SuffixRunner(model, first).self_check(what="knockouts", probe=probes[0].id)
    else:
        PromptRunner(model, first, use_kv=True).self_check(what="knockouts", probe=probes[0].id)
    started = time.perf_counter()
    frames, probe_rows = [], []
    bar = tqdm(total=len(probes) * len(configs), desc="knockouts", unit="config", disable=not progress)
    for probe, toks in zip(probes, probe_tokens):
        state = _clean_state(model, toks.prompt_ids, positions=positions)
        scores = neuron_scores(state.activations, model, by=rank_by, pred_id=state.pred_id,
                               scale=state.last_scale, norms=rank_norms if rank_by != "dla" else None)
        effective = neuron_scores(state.activations, model, by="effective", scale=state.last_scale, norms=eff_norms)
        neurons = _ProbeNeurons(scores.argsort(dim=-1, descending=True, stable=True), effective, probe.id,
                                options.seed)
        metrics = _probe_rows(model, state, configs, neurons, options, target_id=toks.target_id,
                              batch_size=batch_size)
        frame = cfg_frame.copy()
        frame.insert(0, "probe_id", probe.id)
        stats = [neurons.config_stats(c) for c in configs]
        frame["n_zeroed"] = [s[0] for s in stats]
        frame["zeroed_share"] = [s[1] for s in stats]
        frame["score_ratio"] = [s[2] for s in stats]
        frame["clean_pred_id"] = state.pred_id
        for key, values in metrics.items():
            frame[key] = values
        frames.append(frame)
        memorized = state.pred_id == toks.target_id
        probe_rows.append({
            "probe_id": probe.id, "kind": probe.kind, "group": probe_group(probe.kind, memorized),
            "memorized": memorized, "prompt": probe.prompt, "target": probe.target,
            "target_id": toks.target_id, "clean_pred_id": state.pred_id,
            "clean_pred_token": model.tokenizer.decode([state.pred_id]), "clean_pred_prob": state.pred_prob,
            "n_prompt_tokens": len(toks.prompt_ids),
        })
        bar.update(len(configs))
    bar.close()
    seconds = time.perf_counter() - started
    settings = model.settings() | mask_summary(model) | {
        "analysis": "knockouts", "grid": "paper" if options.grid == KnockoutGrid.PAPER else "custom",
        **grid.describe(),
        "controls": list(controls), "rank_by": rank_by, "positions": positions, "norm": options.norm,
        "post_norm": "ln2_post" if post_norm_gains(model) is not None else None,
        "fast_path": "prefix key/value cache" if positions == "last" else "resumed at the window's first layer",
        "seed": options.seed, "n_probes": len(probes), "n_configs": len(configs), "seconds": round(seconds, 2),
        "rank_by_note": {"effective": "|activation| x ||W_out row * post-norm gain|| / clean post-norm RMS",
                         "magnitude": "|activation| x ||W_out row|| (raw; the post-MLP norm ignored)",
                         "dla": "activation x direct push on the prediction; final norm ignored: approximate"}[rank_by],
        "matched_note": "random neurons outside the top-k, seeded order, shortest prefix reaching the top-k's "
                        "summed effective score (closest prefix); see score_ratio",
    }
    return KnockoutResult(rows=pd.concat(frames, ignore_index=True), probes=pd.DataFrame(probe_rows), settings=settings)

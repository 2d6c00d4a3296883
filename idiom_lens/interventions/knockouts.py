"""MLP neuron knockouts (method.md section 4, after Geva et al. 2022).

An MLP output is a sum of value vectors (rows of W_out) weighted by the neuron activations
(`mlp.hook_post`, the coefficients). Per probe, the neurons of every layer are ranked at the last
prompt position by |activation| x ||value vector|| (or, optionally, by their direct attribution to
the predicted token, activation x (W_out row . W_U column); approximate in raw mode because the
post-MLP norm and the final norm are ignored). A configuration zeroes the top-k neurons of every
layer in a window of consecutive layers (``zero_top``) or every neuron but the top-k
(``keep_top``); the control draws the same number of neurons uniformly at random in the same
layers (seeded per probe, layer and k). Metrics per configuration and set: share of probes whose
prediction changes, mean drop of the original prediction's probability, share whose new
prediction is the target.

Positions: by default the knockout acts at the last prompt position only. Earlier positions are
then untouched, so each probe's prefix runs once and its key/value cache is reused: every
configuration costs one token of compute, and the configurations of one probe are the rows of a
batch. ``positions="all"`` zeroes the same neurons at every prompt position (full forward).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.forward import tokenize_probes
from idiom_lens.io import write_parquet
from idiom_lens.memorization import probe_group
from idiom_lens.interventions.runner import PromptRunner, check_probes, last_metrics
from idiom_lens.models import LoadedModel

KnockoutMode = Literal["zero_top", "keep_top"]
RankBy = Literal["magnitude", "dla"]
Positions = Literal["last", "all"]
HookFn = Callable[[Tensor, Any], Tensor | None]

DEFAULT_KS: tuple[int, ...] = (1, 10, 100, 1000)
DEFAULT_WINDOWS: tuple[int, ...] = (1, 2, 3, 4, 5)
DEFAULT_MODES: tuple[KnockoutMode, ...] = ("zero_top", "keep_top")
# Default grid (sized to run 100 probes of the embedded model in well under 15 min on 2 cores):
# k in DEFAULT_KS, every window of 1..5 layers at every start layer, targeted + random,
# zero_top for every k and keep_top for k = 100 (keep_top with small k in a 5-layer window
# ablates whole MLPs and says little about specific neurons). `FULL_GRID` lifts that restriction.
DEFAULT_KEEP_TOP_KS: tuple[int, ...] = (100,)


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


def neuron_scores(
    activations: Float[Tensor, "layer d_mlp"],
    model: LoadedModel,
    *,
    by: RankBy = "magnitude",
    pred_id: int | None = None,
    norms: Float[Tensor, "layer d_mlp"] | None = None,
) -> Float[Tensor, "layer d_mlp"]:
    """Importance of every neuron at one position; higher = knocked out first.

    ``magnitude``: |activation| x ||value vector||. ``dla``: activation x (W_out row . W_U[:, pred]),
    the neuron's direct push on the predicted token (approximate in raw mode: norms ignored).
    """
    if by == "magnitude":
        norms = value_vector_norms(model) if norms is None else norms
        return activations.abs() * norms
    if by == "dla":
        if pred_id is None:
            raise InputError("rank_by='dla' needs the predicted token id")
        with torch.no_grad():
            direction = model.bridge.W_U[:, pred_id].float()  # [d_model]
            push = model.bridge.W_out.float() @ direction  # [layer, d_mlp]
        return activations * push
    raise InputError(f"rank_by must be 'magnitude' or 'dla', got {by!r}")


@dataclass(frozen=True)
class _CleanState:
    runner: PromptRunner
    activations: Float[Tensor, "layer d_mlp"]
    pred_id: int
    pred_prob: float


def _clean_state(model: LoadedModel, prompt_ids: Sequence[int], *, use_kv: bool) -> _CleanState:
    """One clean run: the neuron activations at the last prompt position and the prediction."""
    runner = PromptRunner(model, prompt_ids, use_kv=use_kv)
    acts: dict[int, Tensor] = {}

    def capture(layer: int) -> HookFn:
        def hook(x: Tensor, hook: Any) -> None:
            acts[layer] = x[0, runner.last].detach().float().clone()

        return hook

    hooks = [(f"blocks.{i}.mlp.hook_post", capture(i)) for i in range(model.n_layers)]
    logits = runner.run(1, hooks)[0]
    pred = int(logits.argmax())
    prob = float(logits.softmax(-1)[pred])
    return _CleanState(runner, torch.stack([acts[i] for i in range(model.n_layers)]), pred, prob)


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
        """Indices of the k highest-scoring neurons of every layer."""
        return self.scores.topk(min(k, self.scores.shape[-1]), dim=-1).indices

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
    model: LoadedModel, probes: Sequence[Probe], *, rank_by: RankBy = "magnitude", progress: bool = False
) -> NeuronRanking:
    """Rank every MLP neuron of every layer per probe at the last prompt position."""
    probes = check_probes(probes)
    norms = value_vector_norms(model)
    acts, scores, preds = [], [], []
    probe_tokens = tokenize_probes(model, probes)
    PromptRunner(model, probe_tokens[0].prompt_ids, use_kv=True).self_check(what="neuron ranking", probe=probes[0].id)
    for toks in tqdm(probe_tokens, desc="rank neurons", disable=not progress):
        state = _clean_state(model, toks.prompt_ids, use_kv=True)
        acts.append(state.activations)
        scores.append(neuron_scores(state.activations, model, by=rank_by, pred_id=state.pred_id, norms=norms))
        preds.append(state.pred_id)
    return NeuronRanking(
        tuple(p.id for p in probes), rank_by, torch.stack(acts), torch.stack(scores), tuple(preds),
        settings=model.settings(),
    )


# --------------------------------------------------------------------------------------
# The knockout grid
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KnockoutConfig:
    """One intervention: which neurons (mode, control, k) in which layers (start..end)."""

    mode: str  # zero_top | keep_top
    control: str  # targeted | random
    k: int
    start: int
    end: int  # inclusive

    @property
    def layers(self) -> range:
        return range(self.start, self.end + 1)


def knockout_configs(
    n_layers: int,
    *,
    ks: Sequence[int] = DEFAULT_KS,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    modes: Sequence[str] = DEFAULT_MODES,
    control: str | None = "random",
    keep_top_ks: Sequence[int] | None = DEFAULT_KEEP_TOP_KS,
) -> list[KnockoutConfig]:
    """Every configuration of the grid: windows of each length at every start layer.

    `keep_top_ks` restricts keep_top to these k (None: every k in `ks`).
    """
    if not ks or any(int(k) < 0 for k in ks):
        raise InputError(f"ks must be non-negative integers, got {list(ks)}")
    if not windows or any(w < 1 or w > n_layers for w in windows):
        raise InputError(f"window lengths must be in 1..{n_layers}, got {list(windows)}")
    bad = [m for m in modes if m not in ("zero_top", "keep_top")]
    if not modes or bad:
        raise InputError(f"modes must be among 'zero_top', 'keep_top', got {list(modes)}")
    if control not in ("random", None, "none"):
        raise InputError(f"control must be 'random' or None, got {control!r}")
    controls = ("targeted", "random") if control == "random" else ("targeted",)
    out = []
    for mode in modes:
        mode_ks = ks if mode == "zero_top" or keep_top_ks is None else [k for k in ks if k in set(keep_top_ks)]
        if mode == "keep_top" and not mode_ks:
            mode_ks = ks
        for k in mode_ks:
            for w in sorted(set(windows)):
                for start in range(n_layers - w + 1):
                    for c in controls:
                        out.append(KnockoutConfig(mode, c, int(k), start, start + w - 1))
    return out


@dataclass(frozen=True)
class KnockoutResult:
    """Per probe x configuration outcome of the knockout grid, with per-probe clean facts."""

    rows: pd.DataFrame  # one row per (probe, configuration)
    probes: pd.DataFrame  # one row per probe: id, kind, group, clean prediction, target
    settings: dict[str, Any]

    def to_dataframe(self) -> pd.DataFrame:
        return self.rows.merge(self.probes[["probe_id", "kind", "group"]], on="probe_id", how="left")

    def summary(self) -> pd.DataFrame:
        """Metrics per set and configuration: share changed, mean probability drop, share on target."""
        frame = self.to_dataframe()
        keys = ["group", "mode", "control", "k", "start", "end", "window"]
        out = (
            frame.groupby(keys, sort=True)
            .agg(n=("probe_id", "size"), changed=("changed", "mean"), prob_drop=("prob_drop", "mean"),
                 new_is_target=("new_is_target", "mean"))
            .reset_index()
        )
        return out

    def write(self, out_dir: str, *, stem: str = "knockouts") -> list[str]:
        """Write rows, probes and summary as parquet files (atomic)."""
        from pathlib import Path

        out = Path(out_dir)
        return [
            str(write_parquet(out / f"{stem}.parquet", self.to_dataframe())),
            str(write_parquet(out / f"{stem}_probes.parquet", self.probes)),
            str(write_parquet(out / f"{stem}_summary.parquet", self.summary())),
        ]


def _neuron_sets(
    config: KnockoutConfig, layer: int, order: Int[Tensor, "layer d_mlp"], probe_id: str, seed: int,
    d_mlp: int, cache: dict,
) -> Tensor:
    """The k neurons a configuration selects in one layer (targeted: top-k; random: seeded draw)."""
    k = min(config.k, d_mlp)
    if config.control == "targeted":
        return order[layer, :k]
    key = (layer, k)
    if key not in cache:
        cache[key] = random_neurons(probe_id=probe_id, layer=layer, k=k, d_mlp=d_mlp, seed=seed)
    return cache[key]


def random_neurons(*, probe_id: str, layer: int, k: int, d_mlp: int, seed: int) -> Int[Tensor, " k"]:
    """The random control's k neurons of one layer for one probe: a seeded draw that depends only
    on (seed, probe id, layer, k), so that it is the same in every run, batch and window."""
    gen = torch.Generator().manual_seed(_stable_seed(seed, probe_id, layer, k))
    return torch.randperm(d_mlp, generator=gen)[:k]


def knockout_hooks(
    configs: Sequence[KnockoutConfig],
    *,
    order: Int[Tensor, "layer d_mlp"],
    probe_id: str,
    seed: int,
    last: int,
    n_pos: int,
    positions: Positions = "last",
) -> list[tuple[str, HookFn]]:
    """`mlp.hook_post` hooks applying configuration r to row r of a batch (rows untouched elsewhere)."""
    n_layers, d_mlp = order.shape
    rand_cache: dict = {}
    masks = torch.ones(len(configs), n_layers, d_mlp)  # multiplicative 0/1 mask per row and layer
    touched = torch.zeros(len(configs), n_layers, dtype=torch.bool)
    for r, cfg in enumerate(configs):
        for layer in cfg.layers:
            chosen = _neuron_sets(cfg, layer, order, probe_id, seed, d_mlp, rand_cache)
            if cfg.mode == "zero_top":
                if len(chosen) == 0:
                    continue
                masks[r, layer, chosen] = 0.0
            else:
                if len(chosen) >= d_mlp:
                    continue
                masks[r, layer] = 0.0
                masks[r, layer, chosen] = 1.0
            touched[r, layer] = True
    pos = slice(last, last + 1) if positions == "last" else slice(0, n_pos)
    hooks = []
    for layer in range(n_layers):
        rows = touched[:, layer].nonzero().flatten()
        if len(rows) == 0:
            continue

        def hook(x: Tensor, hook: Any, rows: Tensor = rows, layer: int = layer) -> Tensor:
            x = x.clone()
            x[rows, pos] = x[rows, pos] * masks[rows, layer].to(x.dtype)[:, None, :]
            return x

        hooks.append((f"blocks.{layer}.mlp.hook_post", hook))
    return hooks


def knockout_rows(
    model: LoadedModel,
    state: _CleanState,
    configs: Sequence[KnockoutConfig],
    *,
    order: Int[Tensor, "layer d_mlp"],
    probe_id: str,
    target_id: int,
    seed: int = 0,
    positions: Positions = "last",
    batch_size: int = 128,
) -> dict[str, np.ndarray]:
    """Run the configurations of one probe as rows of batches; metrics per configuration."""
    runner = state.runner
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, len(configs), batch_size):
        chunk = configs[start : start + batch_size]
        hooks = knockout_hooks(chunk, order=order, probe_id=probe_id, seed=seed, last=runner.last,
                               n_pos=runner.n_pos, positions=positions)
        logits = runner.run(len(chunk), hooks)
        parts.append(last_metrics(logits, state.pred_id, state.pred_prob, target_id))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def knockout_grid(
    model: LoadedModel,
    probes: Sequence[Probe],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    windows: Sequence[int] | None = None,
    modes: Sequence[str] = DEFAULT_MODES,
    keep_top_ks: Sequence[int] | None = DEFAULT_KEEP_TOP_KS,
    control: str | None = "random",
    rank_by: RankBy = "magnitude",
    positions: Positions = "last",
    seed: int = 0,
    batch_size: int = 128,
    progress: bool = False,
) -> KnockoutResult:
    """Knock out top-k (or all but top-k) MLP neurons in every layer window, per probe.

    The clean run of each probe (activations, prediction, key/value cache of its prefix) is
    computed once and reused by all its configurations, which run as rows of batches.
    Ranking is at the last prompt position; the knockout acts there (``positions="last"``)
    or at every prompt position (``"all"``).
    """
    probes = check_probes(probes)
    if positions not in ("last", "all"):
        raise InputError(f"positions must be 'last' or 'all', got {positions!r}")
    if rank_by not in ("magnitude", "dla"):
        raise InputError(f"rank_by must be 'magnitude' or 'dla', got {rank_by!r}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if windows is None:  # 1..5 layers, or fewer in a smaller model
        windows = tuple(w for w in DEFAULT_WINDOWS if w <= model.n_layers)
    configs = knockout_configs(
        model.n_layers, ks=ks, windows=windows, modes=modes, control=control, keep_top_ks=keep_top_ks
    )
    probe_tokens = tokenize_probes(model, probes)
    norms = value_vector_norms(model)
    cfg_frame = pd.DataFrame(
        {
            "mode": [c.mode for c in configs], "control": [c.control for c in configs],
            "k": [c.k for c in configs], "start": [c.start for c in configs], "end": [c.end for c in configs],
        }
    )
    cfg_frame["window"] = cfg_frame["end"] - cfg_frame["start"] + 1
    # the shortcuts under the installed versions, against a plain full forward (before any output)
    PromptRunner(model, probe_tokens[0].prompt_ids, use_kv=positions == "last").self_check(
        what="knockouts", probe=probes[0].id)
    started = time.perf_counter()
    frames, probe_rows = [], []
    bar = tqdm(total=len(probes) * len(configs), desc="knockouts", unit="config", disable=not progress)
    for probe, toks in zip(probes, probe_tokens):
        state = _clean_state(model, toks.prompt_ids, use_kv=positions == "last")
        scores = neuron_scores(state.activations, model, by=rank_by, pred_id=state.pred_id, norms=norms)
        order = scores.argsort(dim=-1, descending=True, stable=True)
        metrics = knockout_rows(
            model, state, configs, order=order, probe_id=probe.id, target_id=toks.target_id,
            seed=seed, positions=positions, batch_size=batch_size,
        )
        frame = cfg_frame.copy()
        frame.insert(0, "probe_id", probe.id)
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
    settings = model.settings() | {
        "analysis": "knockouts", "ks": [int(k) for k in ks], "windows": [int(w) for w in windows],
        "modes": list(modes), "keep_top_ks": None if keep_top_ks is None else [int(k) for k in keep_top_ks],
        "control": control, "rank_by": rank_by, "positions": positions, "seed": seed,
        "n_probes": len(probes), "n_configs": len(configs), "seconds": round(seconds, 2),
        "rank_by_note": "dla ignores ln2_post and the final norm: approximate in raw mode" if rank_by == "dla" else "",
    }
    return KnockoutResult(rows=pd.concat(frames, ignore_index=True), probes=pd.DataFrame(probe_rows), settings=settings)

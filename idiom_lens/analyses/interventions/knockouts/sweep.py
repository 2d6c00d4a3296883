"""The knockout sweep: the hooks that knock neurons out, the output diagnostics, and
`knockout_grid`, which runs a grid per probe."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from idiom_lens.analyses.interventions.knockouts.controls import (
    MATCH_CANDIDATES,
    MATCH_TOLERANCE,
    _ProbeNeurons,
)
from idiom_lens.analyses.interventions.knockouts.grid import (
    KnockoutCell,
    KnockoutGrid,
    KnockoutOptions,
    Positions,
    knockout_cells,
)
from idiom_lens.analyses.interventions.knockouts.result import KnockoutResult
from idiom_lens.analyses.interventions.knockouts.scores import (
    _clean_state,
    _CleanState,
    effective_value_vectors,
    mean_activations,
    neuron_scores,
    post_norm_gains,
    value_vector_norms,
)
from idiom_lens.analyses.memorization import probe_group
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.selection import check_probes
from idiom_lens.errors import InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.runners import PromptRunner, SuffixRunner, last_metrics
from idiom_lens.models.vocab import mask_summary, valid_mask
from idiom_lens.types import HookFn


def knockout_hooks(
    configs: Sequence[KnockoutCell],
    neurons: _ProbeNeurons,
    *,
    positions: Positions,
    last: int,
    n_pos: int,
    frozen: tuple[Float[Tensor, "layer d_model"], Float[Tensor, "layer pos"]] | None = None,
    fills: Float[Tensor, "layer d_mlp"] | None = None,
) -> list[tuple[str, HookFn]]:
    """Hooks applying configuration r to row r of a batch (rows untouched elsewhere).

    At the chosen positions `mlp.hook_post` becomes x * keep + (1 - keep) * fill per row and layer,
    keep a 0/1 mask of the neurons left alone and fill the ablation value: 0 (zero ablation,
    `fills` None) or each neuron's mean (`fills`, mean ablation). With `frozen` = (gains g, clean
    scales s per layer and run position), the post-MLP norm's output of the touched rows and
    layers becomes its input * g / s_clean at those positions."""
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
        fill = None if fills is None else (1.0 - masks[rows, layer]) * fills[layer].float()  # [rows, d_mlp]

        def knock_hook(x: Tensor, hook: Any, rows: Tensor = rows, layer: int = layer,
                       fill: Tensor | None = fill) -> Tensor:
            x = x.clone()
            knocked = x[rows, pos] * masks[rows, layer].to(x.device, x.dtype)[:, None, :]
            if fill is not None:
                knocked = knocked + fill.to(x.device, x.dtype)[:, None, :]
            x[rows, pos] = knocked
            return x

        hooks.append((f"blocks.{layer}.mlp.hook_post", knock_hook))
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


def output_capture_hooks(
    layers: Sequence[int], *, last: int, store: dict[int, Tensor],
) -> list[tuple[str, HookFn]]:
    """Hooks keeping every row's MLP-layer output as written into the residual stream
    (`hook_mlp_out`: after the post-MLP norm where there is one, e.g. Gemma's `ln2_post.hook_out`)
    at position `last` of a run, per layer in `store`. Put them after `knockout_hooks`: hooks on one
    hook point run in order, so they read the knocked (and frozen) output."""

    def capture(layer: int) -> HookFn:
        def hook(x: Tensor, hook: Any) -> None:
            store[layer] = x[:, last].detach().float().clone()

        return hook

    return [(f"blocks.{layer}.hook_mlp_out", capture(layer)) for layer in layers]


def output_diagnostics(
    clean: Float[Tensor, "layer d_model"], knocked: Float[Tensor, "layer d_model"],
) -> dict[str, float]:
    """How a knockout changed what a window's MLP layers write into the residual stream at the last
    prompt position: `clean` and `knocked` are the window's layers' outputs (one row per layer),
    summed over the window (what they add to the residual stream together; a window of one layer:
    that layer's output). `removed_norm` = ||clean - knocked||, `out_cosine` = cos(knocked, clean),
    `out_norm_ratio` = ||knocked|| / ||clean||."""
    c, k = clean.double().sum(0), knocked.double().sum(0)
    c_norm, k_norm = float(c.norm()), float(k.norm())
    cosine = float(c @ k) / (c_norm * k_norm) if c_norm > 0 and k_norm > 0 else float("nan")
    return {"removed_norm": float((c - k).norm()), "out_cosine": cosine,
            "out_norm_ratio": k_norm / c_norm if c_norm > 0 else float("nan")}


def _probe_rows(
    model: LoadedModel,
    state: _CleanState,
    configs: Sequence[KnockoutCell],
    neurons: _ProbeNeurons,
    options: KnockoutOptions,
    *,
    target_id: int,
    batch_size: int,
    fills: Float[Tensor, "layer d_mlp"] | None = None,
) -> dict[str, np.ndarray]:
    """Run the cells of one probe as rows of batches; metrics and output diagnostics
    (`output_diagnostics`) per cell (in order), knocked out at `options.positions` with
    `options.norm` and the ablation values `fills` (None: zero).

    With whole prompts (`SuffixRunner`) a batch holds cells of one start layer and resumes there,
    and the batches' last positions are unembedded together at the end (one call of the 671 MB
    unembedding per probe instead of one per start layer)."""
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

    def keep(chunk: list[int], metrics: dict[str, np.ndarray]) -> None:
        for key, values in metrics.items():
            if key not in results:
                results[key] = np.empty(len(configs), dtype=values.dtype)
            results[key][chunk] = values

    reads: list[tuple[list[int], Tensor]] = []  # SuffixRunner: (cells, final-norm outputs), unembedded at the end
    for start, index in groups.items():
        for b in range(0, len(index), batch_size):
            chunk = index[b : b + batch_size]
            cells = [configs[i] for i in chunk]
            hooks = knockout_hooks(cells, neurons, positions=options.positions, last=runner.last,
                                   n_pos=runner.n_pos, frozen=frozen, fills=fills)
            outputs: dict[int, Tensor] = {}
            layers = sorted({layer for cfg in cells for layer in cfg.layers})
            hooks += output_capture_hooks(layers, last=runner.last, store=outputs)
            if isinstance(runner, SuffixRunner):
                reads.append((chunk, runner.run(len(chunk), hooks, start=start, unembed=False)))
            else:
                keep(chunk, last_metrics(runner.run(len(chunk), hooks), state.pred_id, state.pred_prob, target_id,
                                         valid=valid))
            diagnostics: dict[str, np.ndarray] = {}
            for r, cfg in enumerate(cells):
                window = list(cfg.layers)
                knocked = torch.stack([outputs[layer][r] for layer in window])
                for key, value in output_diagnostics(state.outputs[window], knocked).items():
                    diagnostics.setdefault(key, np.empty(len(cells)))[r] = value
            keep(chunk, diagnostics)
    if reads and isinstance(runner, SuffixRunner):
        rows, order = torch.cat([read for _, read in reads]), [i for chunk, _ in reads for i in chunk]
        metrics: dict[str, np.ndarray] = {}
        for b in range(0, len(order), batch_size):  # one batch of logits in memory at a time
            metrics = last_metrics(runner.logits(rows[b : b + batch_size], chunk=batch_size), state.pred_id,
                                   state.pred_prob, target_id, valid=valid)
            keep(order[b : b + batch_size], metrics)
        results = {key: results[key] for key in [*metrics, *(k for k in results if k not in metrics)]}  # as before
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
    controls, `rank_by`, `positions`, `norm`, `ablation` (see the package docstring) and the
    controls' seed. The clean run of each probe is computed once and reused by all its cells, which
    run as rows of batches of `batch_size` (speed and memory only). A mean ablation's reference
    means (`mean_activations`, the bundled ordinary text) are computed once per model.

    Every row carries its variant (`positions`, `rank_by`, `norm`, `ablation`), the outcome
    (`changed`, `prob_drop`, ...) and what the knockout did to the window's MLP outputs at the last
    prompt position: `n_zeroed`, `removed_norm`, `out_cosine`, `out_norm_ratio`
    (`output_diagnostics`), `matched_norm_ratio`, `zeroed_share`, `score_ratio`
    (`_ProbeNeurons.config_stats`).

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
    vectors = effective_value_vectors(model)  # [layer, d_mlp, d_model]: W_out rows x post-MLP gain
    eff_norms = vectors.norm(dim=-1)
    rank_norms = value_vector_norms(model) if rank_by == "magnitude" else eff_norms
    means = mean_activations(model, batch_size=min(batch_size, 32)) if options.ablation == "mean" else None
    fills = None if means is None else means.means
    cfg_frame = pd.DataFrame({
        "positions": positions, "rank_by": rank_by, "norm": options.norm, "ablation": options.ablation,
        "mode": [c.mode for c in configs], "control": [c.control for c in configs],
        "k": [c.k for c in configs], "start": [c.start for c in configs], "end": [c.end for c in configs],
    })
    cfg_frame["window"] = cfg_frame["end"] - cfg_frame["start"] + 1
    # the shortcuts under the installed versions, against a plain full forward (before any output)
    first = probe_tokens[0]
    if positions == "all":
        SuffixRunner(model, first.prompt_ids, suffix_ids=first.suffix_ids).self_check(what="knockouts",
                                                                                      probe=probes[0].id)
    else:
        PromptRunner(model, first.prompt_ids, use_kv=True, suffix_ids=first.suffix_ids).self_check(
            what="knockouts", probe=probes[0].id)
    started = time.perf_counter()
    frames, probe_rows = [], []
    bar = tqdm(total=len(probes) * len(configs), desc="knockouts", unit="config", disable=not progress)
    for probe, toks in zip(probes, probe_tokens):
        state = _clean_state(model, toks, positions=positions)
        scores = neuron_scores(state.activations, model, by=rank_by, pred_id=state.pred_id,
                               scale=state.last_scale, norms=rank_norms if rank_by != "dla" else None)
        effective = neuron_scores(state.activations, model, by="effective", scale=state.last_scale, norms=eff_norms)
        removed = state.activations if fills is None else state.activations - fills
        neurons = _ProbeNeurons(scores.argsort(dim=-1, descending=True, stable=True), effective, probe.id,
                                options.seed, vectors=vectors, coefficients=removed / state.last_scale[:, None])
        metrics = _probe_rows(model, state, configs, neurons, options, target_id=toks.target_id,
                              batch_size=batch_size, fills=fills)
        frame = cfg_frame.copy()
        frame.insert(0, "probe_id", probe.id)
        stats = pd.DataFrame([neurons.config_stats(c) for c in configs])
        for key in ("n_zeroed", "zeroed_share", "score_ratio", "matched_norm_ratio"):
            frame[key] = stats[key].to_numpy()
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
        "ablation": options.ablation,
        "post_norm": "ln2_post" if post_norm_gains(model) is not None else None,
        "fast_path": "prefix key/value cache" if positions == "last" else "resumed at the window's first layer",
        "seed": options.seed, "n_probes": len(probes), "n_configs": len(configs), "seconds": round(seconds, 2),
        "rank_by_note": {"effective": "ours: |activation| x ||W_out row * post-norm gain|| / clean post-norm RMS",
                         "magnitude": "the authors' (Haviv et al. 2023): |m| x ||v||, activation x ||W_out row|| "
                                      "(the post-MLP norm ignored)",
                         "dla": "activation x direct push on the prediction; final norm ignored: approximate"}[rank_by],
        "norm_note": {"frozen": "the post-MLP norm's scale held at its clean value in the knocked-out layers: a "
                                "knockout removes exactly its neurons' contributions (primary)",
                      "live": "the post-MLP norm recomputed on the knocked-out output: it rescales what remains "
                              "(secondary)"}[options.norm],
        "ablation_note": {"zero": "knocked-out activations set to 0",
                          "mean": "knocked-out activations set to their mean over the reference set"}[options.ablation],
        "mean_reference": None if means is None else means.describe(),
        "matched_note": f"matched: as many neurons as the top-k from outside it, the vector they remove (last "
                        f"position, through the clean post-norm scale) matched in norm: best of {MATCH_CANDIDATES} "
                        f"seeded random sets, then greedy single swaps until within {MATCH_TOLERANCE:.0%} "
                        "(see matched_norm_ratio); matched_score: random neurons outside the top-k, seeded "
                        "order, shortest prefix reaching the top-k's summed effective score (see score_ratio)",
        "diagnostics_note": "at the last prompt position, the window's MLP outputs as written into the residual "
                            "stream (after the post-MLP norm), summed over the window: removed_norm = "
                            "||clean - knocked||, out_cosine = cos(knocked, clean), out_norm_ratio = "
                            "||knocked|| / ||clean||",
    }
    return KnockoutResult(rows=pd.concat(frames, ignore_index=True), probes=pd.DataFrame(probe_rows), settings=settings)

"""Layer skipping (method.md section 4): a block's output replaced by its input.

Skipping layer i sets ``blocks.{i}.hook_resid_post`` to the value of ``blocks.{i}.hook_resid_pre``
in the same run. A window of consecutive layers composes naturally: each skipped layer passes
its input through, so the residual after the window equals the residual before it. By default
the whole block is removed (every position); ``positions="last"`` replaces the block's output at
the last prompt position only (then the prefix's key/value cache is reused, as for knockouts).
Metrics are those of the knockouts: share of predictions changed, mean drop of the original
prediction's probability, share whose new prediction is the target; predictions range over real
vocabulary tokens (`idiom_lens.models.vocab`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from idiom_lens.analyses.interventions.knockouts import POSITIONS, Positions
from idiom_lens.analyses.memorization import probe_group
from idiom_lens.analyses.saved import ProbeRowsResult
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.selection import check_probes
from idiom_lens.errors import InputError
from idiom_lens.models.forward import tokenize_probes
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.runners import PromptRunner, last_metrics, masked_prediction
from idiom_lens.models.vocab import mask_summary, valid_mask


def skip_spans(n_layers: int, windows: Sequence[int] = (1, 2, 3, 4, 5)) -> list[tuple[int, ...]]:
    """Every window of consecutive layers of the given lengths, at every start layer."""
    if not windows or any(w < 1 or w > n_layers for w in windows):
        raise InputError(f"window lengths must be in 1..{n_layers}, got {list(windows)}")
    return [tuple(range(s, s + w)) for w in sorted(set(windows)) for s in range(n_layers - w + 1)]


@dataclass(frozen=True)
class SkipResult(ProbeRowsResult):
    """Per probe x skipped span outcome, with per-probe clean facts.

    `to_dataframe`, `save` and `load` come from `ProbeRowsResult`: `skipping.parquet`,
    `skipping_probes.parquet`, `skipping_summary.parquet` and the descriptor.
    """

    default_name = "skipping"

    def summary(self) -> pd.DataFrame:
        """Metrics per set and span."""
        return (
            self.to_dataframe()
            .groupby(["group", "start", "end", "window"], sort=True)
            .agg(n=("probe_id", "size"), changed=("changed", "mean"), prob_drop=("prob_drop", "mean"),
                 new_is_target=("new_is_target", "mean"))
            .reset_index()
        )


def _skip_hooks(spans: Sequence[tuple[int, ...]], n_layers: int, runner: PromptRunner, positions: str):
    """Hooks that make each row skip its own span of layers."""
    pos = slice(runner.last, runner.last + 1) if positions == "last" else slice(0, runner.n_pos)
    stored: dict[int, Tensor] = {}
    hooks = []
    for layer in range(n_layers):
        rows = torch.tensor([r for r, span in enumerate(spans) if layer in span], dtype=torch.long)
        if len(rows) == 0:
            continue

        def keep_input(x: Tensor, hook: Any, layer: int = layer, rows: Tensor = rows) -> None:
            stored[layer] = x[rows, pos].clone()

        def pass_input(x: Tensor, hook: Any, layer: int = layer, rows: Tensor = rows) -> Tensor:
            x = x.clone()
            x[rows, pos] = stored.pop(layer).to(x.dtype)
            return x

        hooks += [(f"blocks.{layer}.hook_resid_pre", keep_input), (f"blocks.{layer}.hook_resid_post", pass_input)]
    return hooks


@dataclass(frozen=True, kw_only=True)
class SkipOptions:
    """What `skip_layers` skips: every window of consecutive layers of the lengths `windows`
    (None: 1-5, or fewer in a smaller model), or exactly the given `spans` (layer tuples; ()
    skips nothing), at every prompt position or the last one (`positions`). Raises `InputError`
    for a bad value."""

    windows: tuple[int, ...] | None = None
    spans: tuple[tuple[int, ...], ...] | None = None
    positions: Positions = "all"

    def __post_init__(self) -> None:
        if self.windows is not None:
            object.__setattr__(self, "windows", tuple(int(w) for w in self.windows))
        if self.spans is not None:
            object.__setattr__(self, "spans", tuple(tuple(int(i) for i in s) for s in self.spans))
        if self.positions not in POSITIONS:
            raise InputError(f"positions must be 'last' or 'all', got {self.positions!r}")


def skip_layers(
    model: LoadedModel,
    probes: Sequence[Probe],
    options: SkipOptions = SkipOptions(),
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> SkipResult:
    """Skip every window of consecutive layers (or the given spans) per probe (`SkipOptions`).

    Raises `InputError` for a batch size below 1 or a span outside the model's layers;
    `FastPathError` when its fast path disagrees with a full forward.
    """
    probes = check_probes(probes)
    if not isinstance(options, SkipOptions):
        raise InputError(f"options must be a SkipOptions, got {type(options).__name__}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    windows, spans, positions = options.windows, options.spans, options.positions
    n_layers = model.n_layers
    if windows is None:  # 1..5 layers, or fewer in a smaller model
        windows = tuple(w for w in (1, 2, 3, 4, 5) if w <= n_layers)
    if spans is None:
        span_list = skip_spans(n_layers, windows)
    else:
        span_list = [tuple(sorted(set(int(i) for i in s))) for s in spans]
        for s in span_list:
            if any(i < 0 or i >= n_layers for i in s):
                raise InputError(f"span {s} has layers outside 0..{n_layers - 1}")
    probe_tokens = tokenize_probes(model, probes)
    # the shortcuts under the installed versions, against a plain full forward (before any output)
    first = probe_tokens[0]
    PromptRunner(model, first.prompt_ids, use_kv=positions == "last", suffix_ids=first.suffix_ids).self_check(
        what="layer skipping", probe=probes[0].id)
    started = time.perf_counter()
    valid = valid_mask(model)
    frames, probe_rows = [], []
    bar = tqdm(total=len(probes) * len(span_list), desc="layer skipping", unit="span", disable=not progress)
    for probe, toks in zip(probes, probe_tokens):
        runner = PromptRunner(model, toks.prompt_ids, use_kv=positions == "last", suffix_ids=toks.suffix_ids)
        pred, prob = masked_prediction(runner.run(1, [])[0], valid)
        parts = []
        for start in range(0, len(span_list), batch_size):
            chunk = span_list[start : start + batch_size]
            logits = runner.run(len(chunk), _skip_hooks(chunk, n_layers, runner, positions))
            parts.append(last_metrics(logits, pred, prob, toks.target_id, valid=valid))
        metrics = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        frame = pd.DataFrame({
            "probe_id": probe.id,
            "start": [s[0] if s else -1 for s in span_list],
            "end": [s[-1] if s else -1 for s in span_list],
            "window": [len(s) for s in span_list],
            "layers": [",".join(map(str, s)) for s in span_list],
            "clean_pred_id": pred,
        })
        for key, values in metrics.items():
            frame[key] = values
        frames.append(frame)
        memorized = pred == toks.target_id
        probe_rows.append({
            "probe_id": probe.id, "kind": probe.kind, "group": probe_group(probe.kind, memorized),
            "memorized": memorized, "target_id": toks.target_id, "clean_pred_id": pred, "clean_pred_prob": prob,
        })
        bar.update(len(span_list))
    bar.close()
    settings = model.settings() | mask_summary(model) | {
        "analysis": "layer_skipping", "windows": [int(w) for w in windows] if spans is None else None,
        "positions": positions, "n_probes": len(probes), "n_spans": len(span_list),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return SkipResult(rows=pd.concat(frames, ignore_index=True), probes=pd.DataFrame(probe_rows), settings=settings)

"""Causal tracing (after Meng et al. 2022, ROME): where restoring one clean activation brings the
memorized prediction back into a corrupted run.

- **Corrupt**: Gaussian noise is added to the input embeddings (the residual stream entering
  block 0, i.e. after the model's own embedding scaling: Gemma multiplies by sqrt(d_model)) at
  the noised positions: by default every prompt token but the BOS and the last; `noise_words`
  chooses a word span instead. The noise standard deviation is `multiplier` (3, as ROME) times the
  standard deviation of the model's input embeddings over the bundled ordinary-text set
  (`noise_scale`), recorded with the result. `noise_samples` draws per probe (default 10), seeded by
  (seed, probe id).
- **Restore** the clean activation at one position, in one layer or in a window of consecutive
  layers centered on it and clipped at the edges (ROME's windows), for three sites: ``resid``
  (the block's output: the residual stream after layer l), ``mlp`` and ``attn`` (what the MLP and
  attention add to the residual, after Gemma's post-norms).
- **Metric**: the probability of the clean prediction (masked softmax over real vocabulary
  tokens). Indirect effect (IE) = restored - corrupted; total effect = clean - corrupted; both
  averaged over the noise samples.

Speed: the corrupted run of every noise sample runs once and records the residual stream
entering every block; a restored row resumes at the window's first layer from it
(`SuffixRunner`), so the layers below run once per sample, not once per cell. Rows = (cell,
noise sample), in batches. Positions before the first noised token are not run: clean and
corrupted activations there are identical (causal attention), so restoring them changes nothing
and their IE is exactly 0. The first probe is checked at run time against plain full forwards
(clean, and noised through `run_with_hooks`); tests compare every cell with a naive loop of one
full forward per (sample, layer, position) (`tests/reference.py`).
"""

from __future__ import annotations

import hashlib
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

from idiom_lens.analyses.memorization import probe_group
from idiom_lens.analyses.saved import ProbeRowsResult
from idiom_lens.analyses.stats import bootstrap_mean_ci
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.selection import check_probes
from idiom_lens.errors import InputError
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.runners import SuffixRunner
from idiom_lens.models.selfcheck import check_close
from idiom_lens.models.tokenization import pad_id, right_pad, split_probe
from idiom_lens.models.vocab import mask_logits, mask_summary, valid_mask

Site = Literal["resid", "mlp", "attn"]
TRACE_SITES: tuple[str, ...] = ("resid", "mlp", "attn")
HOOKS = {"resid": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
POSITION_CLASSES: tuple[str, ...] = ("before", "first noised", "mid noised", "last noised", "after noised", "last")


# --------------------------------------------------------------------------------------
# Noise
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoiseScale:
    """The noise's standard deviation: `multiplier` x the std of the input embeddings (`std`),
    measured over `n_tokens` tokens of `source`."""

    std: float
    multiplier: float
    n_tokens: int
    source: str

    @property
    def sigma(self) -> float:
        return self.std * self.multiplier

    def settings(self) -> dict[str, Any]:
        return {"noise_std_embeddings": self.std, "noise_multiplier": self.multiplier, "noise_sigma": self.sigma,
                "noise_std_tokens": self.n_tokens, "noise_std_source": self.source}


def noise_scale(
    model: LoadedModel, texts: Sequence[str] | None = None, *, multiplier: float = 3.0, batch_size: int = 32,
) -> NoiseScale:
    """`multiplier` x the standard deviation of the input embeddings (the residual stream entering
    block 0, after the model's embedding scaling) over every non-BOS token of `texts`; by default
    the prompts of the bundled ordinary-text set (ROME measures it over its subjects)."""
    if not multiplier >= 0:
        raise InputError(f"noise multiplier must be >= 0, got {multiplier}")
    source = "given texts"
    if texts is None:
        from idiom_lens.datasets import load_probes

        texts = [p.prompt for p in load_probes("text")]
        source = "bundled text set (prompts)"
    if not texts:
        raise InputError("noise_scale needs at least one text")
    tok = model.tokenizer
    seqs = [split_probe(tok, t, "x") for t in texts]  # the prompt's tokens as a probe would see them
    values: list[Tensor] = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i : i + batch_size]
        tokens, _ = right_pad([s.prompt_ids for s in chunk], pad_id=pad_id(tok))
        got: dict[str, Tensor] = {}

        def keep(x: Tensor, hook: Any) -> None:
            got["x"] = x.detach()  # noqa: B023 (called within this iteration)

        with torch.no_grad():
            model.bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=[("blocks.0.hook_resid_pre", keep)],
                                        stop_at_layer=1)
        for row, s in enumerate(chunk):
            values.append(got["x"][row, int(s.has_bos) : len(s.prompt_ids)].float().reshape(-1))
    flat = torch.cat(values)
    n_tokens = flat.numel() // model.d_model
    return NoiseScale(float(flat.std()), float(multiplier), int(n_tokens), source)


def trace_noise(
    key: str, *, seed: int, samples: int, n_positions: int, d_model: int, sigma: float,
) -> Float[Tensor, "sample noised d_model"]:
    """The noise of one probe: seeded by (seed, key), the same on every machine and call."""
    digest = hashlib.sha256(f"{seed}|{key}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn((samples, n_positions, d_model), generator=generator) * sigma


def word_positions(tokenizer: Any, prompt: str, target: str, words: tuple[int, int]) -> tuple[int, ...]:
    """Token positions (BOS counted) of the prompt words words[0]..words[1]-1 (negative counts
    from the end, Python slice rules)."""
    parts = prompt.split()
    chosen = range(len(parts))[slice(*words)]
    if not chosen:
        raise InputError(f"noise_words {words} select no word of the {len(parts)}-word prompt {prompt!r}")
    starts, pos = [], 0
    for w in parts:
        pos = prompt.index(w, pos)
        starts.append((pos, pos + len(w)))
        pos += len(w)
    lo, hi = starts[chosen[0]][0], starts[chosen[-1]][1]
    encoded = tokenizer(f"{prompt} {target}", return_offsets_mapping=True, add_special_tokens=True)
    ids = split_probe(tokenizer, prompt, target).prompt_ids
    if list(encoded["input_ids"][: len(ids)]) != list(ids):
        raise InputError(f"cannot map words to tokens in {prompt!r}: the prompt tokens differ from the text's")
    offsets = [tuple(o) for o in encoded["offset_mapping"][: len(ids)]]
    return tuple(i for i, (a, b) in enumerate(offsets) if b > a and a < hi and b > lo)


def default_noised(n_tokens: int, has_bos: bool) -> tuple[int, ...]:
    """Every prompt token but the BOS and the last."""
    return tuple(range(int(has_bos), n_tokens - 1))


def layer_window(layer: int, window: int, n_layers: int) -> tuple[int, ...]:
    """`window` consecutive layers centered on `layer`, clipped at the model's edges (ROME's rule)."""
    if window < 1:
        raise InputError(f"window must be >= 1, got {window}")
    return tuple(range(max(0, layer - window // 2), min(n_layers, layer - window // 2 + window)))


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
    per noise sample."""

    specs: tuple[tuple[str, int], ...]  # (site, window) per row of `restored`
    restored: Float[Tensor, "spec layer pos sample"]
    corrupted: Float[Tensor, " sample"]
    clean_prob: float
    clean_pred_id: int
    noised: tuple[int, ...]

    @property
    def indirect_effect(self) -> Float[Tensor, "spec layer pos"]:
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
    batch_size: int = 128,
    check: str | None = None,
) -> PromptTrace:
    """Restore every (site, window, layer, position) cell of one prompt under each noise sample.

    `noise` is added at the `noised` positions of the input embeddings. `check` (a probe name)
    compares the clean and one noised run with plain full forwards first (`FastPathError`)."""
    n_layers, n_pos = model.n_layers, len(prompt_ids)
    noised = tuple(int(p) for p in noised)
    if not noised or sorted(set(noised)) != list(noised) or noised[0] < 0 or noised[-1] >= n_pos:
        raise InputError(f"noised positions must be sorted, unique and in 0..{n_pos - 1}, got {list(noised)}")
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

    runner = SuffixRunner(model, prompt_ids, capture=[(f"blocks.{l}.{HOOKS[s]}", keep((s, l))) for s, l in needed])
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

    corrupted_logits = runner.run(n_samples, [(f"blocks.{l}.hook_resid_pre", enter(l)) for l in range(n_layers)],
                                  start=0, resid=x0)
    if check is not None:
        check_close(runner.run(1, [], start=0)[0], _plain(model, prompt_ids), what="causal tracing (clean)",
                    probe=check)
        check_close(corrupted_logits[0], _plain(model, prompt_ids, noised=noised_t, noise=noise[0]),
                    what="causal tracing (noised, resumed)", probe=check)
    corrupted = prob_of_pred(corrupted_logits)

    # Every restored row: (spec, layer, position, sample), grouped by the layer it resumes at.
    first_pos = noised[0]
    restored = corrupted.reshape(1, 1, 1, -1).repeat(len(specs), n_layers, n_pos, 1)  # unrun cells: IE 0
    rows_by_start: dict[int, list[tuple[int, int, int, tuple[int, ...]]]] = {}
    for si, (_site, window) in enumerate(specs):
        for layer in range(n_layers):
            layers = layer_window(layer, window, n_layers)
            for pos in range(first_pos, n_pos):
                rows_by_start.setdefault(layers[0], []).append((si, layer, pos, layers))
    for start in sorted(rows_by_start):
        cells = rows_by_start[start]
        per_batch = max(1, batch_size // n_samples)
        for i in range(0, len(cells), per_batch):
            chunk = cells[i : i + per_batch]
            logits = runner.run(len(chunk) * n_samples, _restore_hooks(chunk, specs, clean, n_samples),
                                start=start, resid=entering[start].repeat(len(chunk), 1, 1))
            probs = prob_of_pred(logits).reshape(len(chunk), n_samples)
            for (si, layer, pos, _), p in zip(chunk, probs):
                restored[si, layer, pos] = p
    return PromptTrace(tuple(specs), restored, corrupted, float(clean_logp[pred].exp()), pred, noised)


def _restore_hooks(
    cells: Sequence[tuple[int, int, int, tuple[int, ...]]], specs: Sequence[tuple[str, int]],
    clean: dict[tuple[str, int], Tensor], n_samples: int,
) -> list[tuple[str, Any]]:
    """Hooks writing the clean activation into rows (cell c, sample s) = row c * n_samples + s."""
    targets: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for c, (si, _, pos, layers) in enumerate(cells):
        for layer in layers:
            targets.setdefault((specs[si][0], layer), []).extend((c * n_samples + s, pos) for s in range(n_samples))
    hooks = []
    for (site, layer), pairs in sorted(targets.items()):
        rows = torch.tensor([r for r, _ in pairs])
        pos = torch.tensor([p for _, p in pairs])
        value = clean[(site, layer)][pos]

        def hook(x: Tensor, hook: Any, rows: Tensor = rows, pos: Tensor = pos, value: Tensor = value) -> Tensor:
            x = x.clone()
            x[rows, pos] = value.to(x.dtype)
            return x

        hooks.append((f"blocks.{layer}.{HOOKS[site]}", hook))
    return hooks


def _plain(
    model: LoadedModel, prompt_ids: Sequence[int], *, noised: Tensor | None = None, noise: Tensor | None = None,
) -> Float[Tensor, " d_vocab"]:
    """A plain full forward through the bridge, the noise (if any) added by a hook."""
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    hooks = []
    if noise is not None:
        def add(x: Tensor, hook: Any) -> Tensor:
            x = x.clone()
            x[0, noised] += noise.to(x.dtype)
            return x

        hooks.append(("blocks.0.hook_resid_pre", add))
    with torch.no_grad():
        return model.bridge.run_with_hooks(tokens, fwd_hooks=hooks)[0, -1].float()


# --------------------------------------------------------------------------------------
# A probe set
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TracingResult(ProbeRowsResult):
    """Causal tracing of a probe set: rows per (probe, site, window, layer, position) with the
    mean restored probability of the clean prediction and its indirect effect; one row per probe
    with the clean and corrupted probabilities. Saved like the knockouts (`analyses.saved`)."""

    default_name: ClassVar[str] = "tracing"

    def summary(self, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """Average indirect effect per set, site, window, layer and position class (positions of a
        class averaged within a probe first), with a 95% percentile-bootstrap interval over probes."""
        frame = self.to_dataframe()
        if frame.empty:
            return pd.DataFrame(columns=["group", "site", "window", "layer", "position", "n", "aie", "aie_low",
                                         "aie_high"])
        per_probe = frame.groupby(["group", "site", "window", "position", "layer", "probe_id"], sort=False)["ie"].mean()
        out = []
        for (group, site, window, position), part in per_probe.groupby(level=[0, 1, 2, 3], sort=False):
            table = part.unstack("layer")  # probe x layer
            mean, low, high = bootstrap_mean_ci(table.to_numpy(), n_boot=n_boot, seed=seed)
            for j, layer in enumerate(table.columns):
                out.append({"group": group, "site": site, "window": int(window), "layer": int(layer),
                            "position": position, "n": int(table.shape[0]),
                            "aie": float(mean[j]), "aie_low": float(low[j]), "aie_high": float(high[j])})
        summary = pd.DataFrame(out)
        order = {c: i for i, c in enumerate(POSITION_CLASSES)}
        return summary.sort_values(["group", "site", "window", "position", "layer"],
                                   key=lambda s: s.map(order) if s.name == "position" else s).reset_index(drop=True)

    def heatmap(self, *, site: str, window: int, group: str | None = None) -> pd.DataFrame:
        """Mean indirect effect, layer x position counted from the end (-1 = the last token)."""
        frame = self.to_dataframe()
        frame = frame[(frame["site"] == site) & (frame["window"] == window)]
        if group is not None:
            frame = frame[frame["group"] == group]
        return frame.pivot_table(index="layer", columns="pos_from_end", values="ie", aggfunc="mean")


@dataclass(frozen=True, kw_only=True)
class TracingOptions:
    """What `causal_trace` runs: the restored `sites` (`TRACE_SITES`), the window sizes for mlp and
    attn (resid is one layer), `noise_samples` draws per probe, the noise std as a `multiplier` of
    the input embeddings' std, the noised words (`noise_words` = (first, stop) word indices; None:
    every token but the BOS and the last) and the noise `seed`. Raises `InputError` for a bad value."""

    sites: tuple[str, ...] = TRACE_SITES
    windows: tuple[int, ...] = (1, 10)
    noise_samples: int = 10
    multiplier: float = 3.0
    noise_words: tuple[int, int] | None = None
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
        if self.noise_words is not None:
            if len(self.noise_words) != 2:
                raise InputError(f"noise_words must be (first, stop) word indices, got {self.noise_words!r}")
            object.__setattr__(self, "noise_words", (int(self.noise_words[0]), int(self.noise_words[1])))


def causal_trace(
    model: LoadedModel,
    probes: Sequence[Probe],
    options: TracingOptions = TracingOptions(),
    *,
    scale: NoiseScale | None = None,
    batch_size: int = 128,
    progress: bool = False,
) -> TracingResult:
    """Causal tracing of every probe (see the module docstring): per (site, window, layer,
    position), the probability of the clean prediction when that clean activation is restored
    into the noised run, averaged over `options.noise_samples` noise draws.

    `scale` reuses a measured `NoiseScale` (default: `noise_scale(model, multiplier=options.multiplier)`).
    `batch_size` (rows per forward) changes speed and memory only. Raises `FastPathError` when the
    fast path disagrees with a full forward.
    """
    if not isinstance(options, TracingOptions):
        raise InputError(f"options must be a TracingOptions, got {type(options).__name__}")
    sites, windows, samples = options.sites, options.windows, options.noise_samples
    noise_words, seed = options.noise_words, options.seed
    probes = check_probes(probes)
    specs = trace_specs(sites, windows)
    scale = scale if scale is not None else noise_scale(model, multiplier=options.multiplier)
    started = time.perf_counter()
    decode = model.tokenizer.decode
    frames, probe_rows = [], []
    for i, probe in enumerate(tqdm(probes, desc="causal tracing", unit="probe", disable=not progress)):
        tokens = split_probe(model.tokenizer, probe.prompt, probe.target)
        ids = tokens.prompt_ids
        if noise_words is None:
            noised = default_noised(len(ids), tokens.has_bos)
        else:
            noised = word_positions(model.tokenizer, probe.prompt, probe.target, noise_words)
        if not noised:
            raise InputError(f"probe {probe.id!r}: nothing to noise in {probe.prompt!r} (a one-token prompt)")
        noise = trace_noise(probe.id, seed=seed, samples=samples, n_positions=len(noised), d_model=model.d_model,
                            sigma=scale.sigma)
        trace = trace_prompt(model, ids, noised=noised, noise=noise, specs=specs, batch_size=batch_size,
                             check=probe.id if i == 0 else None)
        n_spec, n_layers, n_pos = trace.restored.shape[:3]
        s_idx, l_idx, p_idx = np.meshgrid(np.arange(n_spec), np.arange(n_layers), np.arange(n_pos), indexing="ij")
        s_idx, l_idx, p_idx = s_idx.ravel(), l_idx.ravel(), p_idx.ravel()
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
        "noised": ("every prompt token but the BOS and the last" if noise_words is None
                   else f"words {list(noise_words)}"),
        "noise_site": "blocks.0.hook_resid_pre (after the embedding scale)",
        "restored_site": {s: HOOKS[s] for s in sites}, "n_probes": len(probes),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return TracingResult(rows=rows, probes=pd.DataFrame(probe_rows), settings=settings)

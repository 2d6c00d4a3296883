"""Training and evaluating learned lenses on a `LensCorpus`, resumable, on CPU in minutes.

- `collect_residuals`: block outputs (`resid_post`) at every layer and every non-BOS position of
  the tokenized sentences, one batched forward each.
- `train_tuned_lens`: the translators h + h A_l + b_l start at the identity (the logit lens) and
  are trained with Adam (learning rate decayed linearly to 0) to minimise KL(final output || lens
  read-out at layer l), over the real vocabulary (the read-out's mask). The unembedding products
  run in bfloat16 only where the hardware makes that fast (`models.precision.matmul_precision`: a
  step 1.7x faster with AMX, the products about 200x slower where bf16 is emulated), in fp32
  elsewhere; the lens records which. The held-out evaluation is always fp32. A checkpoint is
  written atomically every `checkpoint_every` steps; a rerun resumes from it with the same batches (the batch order is a
  function of the seed and the step), so an interrupted and a straight run give the same lens.
  The lens records its training curve (`training_curve`): each step's training loss and, when
  held-out rows are given, the held-out KL every `heldout_every` steps.
- `fit_jacobian_lens`: TransformerLens's `JacobianLens.fit` over slices of sentences; each finished
  slice is saved, a rerun fits only the missing ones, and `JacobianLens.merge` averages them.
- `heldout_kl`: per lens and layer, the mean KL(final || lens) over held-out tokens in fp32,
  with a bootstrap 95% interval over held-out sentences. Which held-out text: whatever rows the
  caller gives; the lens cache gives a seeded selection of about `LensSettings.heldout_tokens`
  positions of the corpus's held-out pool (by default lee.cor and the held-out model samples)
  and records the selection's sentences per origin (`heldout_used` in the lens's settings).
- `probe_kl`: the same KL where the analyses read the lens, at the last prompt token of each
  probe, per layer, for the logit lens and a learned lens side by side.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.faults import maybe_fail
from idiom_lens.io import atomic_write
from idiom_lens.lenses.lens import Lens, identity_tuned_lens, logit_lens
from idiom_lens.models.loading import require_causal
from idiom_lens.models.precision import PrecisionChoice, matmul_precision
from idiom_lens.models.tokenization import pad_id, right_pad
from idiom_lens.models.vocab import valid_mask


def collect_residuals(
    model: Any, sequences: Sequence[Sequence[int]], *, batch_size: int = 32
) -> tuple[Float[Tensor, "token layer d_model"], Int[Tensor, " token"]]:
    """`resid_post` of every layer at every position but the first (BOS) of each sequence, and the
    index of the sequence each row came from."""
    require_causal(model, "learned-lens training")
    rows: list[Tensor] = []
    owner: list[Tensor] = []
    for start in range(0, len(sequences), batch_size):
        stacked, last = _resid_post(model, sequences[start : start + batch_size])
        for i, length in enumerate((last + 1).tolist()):
            rows.append(stacked[i, 1:length])
            owner.append(torch.full((length - 1,), start + i, dtype=torch.long))
    return torch.cat(rows), torch.cat(owner)


def last_position_residuals(
    model: Any, sequences: Sequence[Sequence[int]], *, batch_size: int = 32
) -> Float[Tensor, "sequence layer d_model"]:
    """`resid_post` of every layer at the last position of each sequence (fp32, on the CPU)."""
    require_causal(model, "learned-lens training")
    rows = []
    for start in range(0, len(sequences), batch_size):
        stacked, last = _resid_post(model, sequences[start : start + batch_size])
        rows.append(stacked[torch.arange(len(last)), last])
    return torch.cat(rows)


def _resid_post(
    model: Any, sequences: Sequence[Sequence[int]]
) -> tuple[Float[Tensor, "batch pos layer d_model"], Int[Tensor, " batch"]]:
    """One right-padded forward of `sequences`: `resid_post` of every layer (fp32, CPU) and each
    sequence's last index."""
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.n_layers)]
    tokens, last = right_pad([list(s) for s in sequences], pad_id=pad_id(model.tokenizer))
    captured: dict[str, Tensor] = {}

    def keeper(name: str) -> Callable[[Tensor, Any], None]:
        def keep(act: Tensor, hook: Any) -> None:
            captured[name] = act.detach()
        return keep

    with torch.no_grad():
        model.bridge.run_with_hooks(tokens.to(model.device), return_type=None,
                                    fwd_hooks=[(n, keeper(n)) for n in names])
    return torch.stack([captured[n] for n in names], dim=2).float().cpu(), last.cpu()


def lens_logits(model: Any, x: Float[Tensor, "n d_model"], *, dtype: torch.dtype = torch.float32,
                W_U: Tensor | None = None) -> Float[Tensor, "n d_vocab"]:
    """ln_final -> unembed -> output transform, masked to the real vocabulary (differentiable)."""
    bridge = model.bridge
    z = bridge.ln_final(x.unsqueeze(0)).squeeze(0)
    W = bridge.W_U if W_U is None else W_U
    logits = (z.to(dtype) @ W.to(dtype)).float()
    if bridge.b_U is not None:
        logits = logits + bridge.b_U.float()
    transform = getattr(bridge.adapter, "apply_output_logits_transform", None)
    if callable(transform):
        logits = transform(logits)
    return logits.masked_fill(~valid_mask(model), torch.finfo(logits.dtype).min)


_EXP_FLOOR = -80.0


@torch.no_grad()
def _kl_and_grad(
    model: Any, normed: Float[Tensor, "n d_model"], target: Float[Tensor, "n d_vocab"],
    target_neg_entropy: Float[Tensor, " n"], W_U: Tensor, buffers: dict[str, Tensor],
) -> tuple[float, Float[Tensor, "n d_model"]]:
    """Mean KL(target || softmax(normed W_U + b_U)) over rows and its gradient with respect to
    `normed`, by hand: d KL / d logits = (q - p) / n. Fewer passes over the [n, d_vocab] logits than
    autograd (the training's cost), into reused buffers, and nothing of that size is kept for a
    backward pass."""
    bridge = model.bridge
    cap = getattr(bridge.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:
        raise InputError("tuned-lens training does not handle a logit soft cap yet")  # no embedded model has one
    n, d_vocab = normed.shape[0], W_U.shape[1]
    if "logits" not in buffers or buffers["logits"].shape[0] < n:
        buffers["logits"] = torch.empty(n, d_vocab, device=normed.device)
        buffers["work"] = torch.empty(n, d_vocab, device=normed.device)
    logits, work = buffers["logits"][:n], buffers["work"][:n]
    logits.copy_(normed.to(W_U.dtype) @ W_U)
    if bridge.b_U is not None:
        logits += bridge.b_U.float()
    valid = valid_mask(model)
    logits.masked_fill_(~valid, torch.finfo(logits.dtype).min)
    # exp of very negative numbers takes a slow path on this CPU (10x): clamp at -80 first, which
    # changes each probability below 1.8e-35 by less than 1.8e-35
    top = logits.max(dim=-1, keepdim=True).values
    lse = top + torch.sub(logits, top, out=work).clamp_min_(_EXP_FLOOR).exp_().sum(-1, keepdim=True).log_()
    # KL = sum p log p - sum p logit + lse
    kl = (target_neg_entropy - torch.mul(target, logits, out=work).sum(-1) + lse.squeeze(-1)).mean()
    grad = logits.sub_(lse).clamp_min_(_EXP_FLOOR).exp_().sub_(target)  # q - p, in place
    grad.masked_fill_(~valid, 0.0)
    return float(kl), (grad.to(W_U.dtype) @ W_U.T).float().div_(n)


def _batch_rows(n_rows: int, batch: int, step: int, seed: int) -> Tensor:
    """The rows of step `step`: a seeded permutation per epoch, so any step's batch is known alone."""
    per_epoch = max(1, n_rows // batch)
    epoch, k = divmod(step, per_epoch)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=generator)[k * batch : (k + 1) * batch]


def train_tuned_lens(
    model: Any,
    residuals: Float[Tensor, "token layer d_model"],
    *,
    steps: int = 120,
    batch_tokens: int = 128,
    lr: float = 3e-4,
    seed: int = 0,
    matmul_dtype: torch.dtype | None = None,
    checkpoint: Path | None = None,
    checkpoint_every: int = 10,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    heldout: Float[Tensor, "heldout_token layer d_model"] | None = None,
    heldout_every: int = 10,
    log: Callable[[str], None] = print,
) -> Lens:
    """A tuned lens trained on `residuals` (from `collect_residuals`); resumes from `checkpoint`.
    `matmul_dtype` None: the dtype `matmul_precision` chooses for the model's device. The lens's
    settings record the dtype used and why (`matmul_dtype`, `matmul_dtype_reason`) and the
    training curve (`training_curve` reads it): the training loss of every step and, when
    `heldout` rows are given (from `collect_residuals` on held-out text), the held-out KL in fp32
    before the first step, every `heldout_every` steps and after the last (each evaluation costs
    about as much as a step on as many rows, so give a few hundred rows)."""
    if steps < 1 or batch_tokens < 1 or heldout_every < 1:
        raise InputError(f"steps, batch_tokens and heldout_every must be >= 1, got {steps}, {batch_tokens} "
                         f"and {heldout_every}")
    n_layers, d = model.n_layers, model.d_model
    if residuals.ndim != 3 or residuals.shape[1:] != (n_layers, d):
        raise InputError(f"residuals must be [token, {n_layers}, {d}], got {tuple(residuals.shape)}")
    if heldout is not None and (heldout.ndim != 3 or heldout.shape[1:] != (n_layers, d) or not len(heldout)):
        raise InputError(f"heldout must be [token, {n_layers}, {d}] with a token, got {tuple(heldout.shape)}")
    if matmul_dtype is None:
        precision = matmul_precision(model.device, log=log)
    else:
        precision = PrecisionChoice(matmul_dtype, torch.device(model.device).type, "given by the caller")
    torch.manual_seed(seed)
    weight = torch.zeros(n_layers - 1, d, d, requires_grad=True)
    bias = torch.zeros(n_layers - 1, d, requires_grad=True)
    optimizer = torch.optim.Adam([weight, bias], lr=lr)
    done = 0
    curve = _Curve(train_kl=[], heldout={})
    if checkpoint is not None and checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        with torch.no_grad():
            weight.copy_(state["weight"])
            bias.copy_(state["bias"])
        optimizer.load_state_dict(state["optimizer"])
        done = int(state["step"])
        # checkpoints written before the curve was recorded: the earlier steps' losses are unknown
        train_kl = [float(v) for v in state.get("train_kl", [])]
        curve = _Curve(train_kl=train_kl + [math.nan] * (done - len(train_kl)),
                       heldout={int(k): float(v) for k, v in zip(state.get("heldout_step", []),
                                                                 state.get("heldout_kl", []))})
        log(f"  tuned lens: resuming at step {done}/{steps} from {checkpoint}")
        earlier = state.get("matmul_dtype", "bfloat16")  # checkpoints before the choice were bf16
        if earlier != precision.name:
            precision = dataclasses.replace(
                precision, reason=f"{precision.reason}; the first {done} steps ran in {earlier} "
                                  "(resumed from a checkpoint written in that precision)")
    W_U = model.bridge.W_U.detach().to(precision.dtype)
    # The model's weights are frozen for the training and given back as they were: TransformerLens
    # picks its norms' code path by requires_grad, so a model left frozen would round other
    # analyses differently (in the last bits) from a freshly loaded one, e.g. on a Ray worker.
    frozen = [p for p in model.bridge.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        weight, bias = _train_steps(model, residuals, weight, bias, optimizer, precision=precision, W_U=W_U, done=done,
                                    steps=steps, batch_tokens=batch_tokens, lr=lr, seed=seed, checkpoint=checkpoint,
                                    checkpoint_every=checkpoint_every, progress=progress, curve=curve,
                                    heldout=heldout, heldout_every=heldout_every)
        if heldout is not None and steps not in curve.heldout:
            curve.heldout[steps] = _mean_heldout_kl(model, weight, bias, heldout)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    lens = identity_tuned_lens(model, **(settings or {}), **precision.describe(), training_curve=curve.describe())
    assert lens.translators is not None
    lens.translators["weight"][: n_layers - 1] = weight.detach()
    lens.translators["bias"][: n_layers - 1] = bias.detach()
    return lens


def _train_steps(
    model: Any, residuals: Tensor, weight: Tensor, bias: Tensor, optimizer: torch.optim.Optimizer, *,
    precision: PrecisionChoice, W_U: Tensor, done: int, steps: int, batch_tokens: int, lr: float, seed: int,
    checkpoint: Path | None, checkpoint_every: int, progress: bool, curve: _Curve,
    heldout: Tensor | None, heldout_every: int,
) -> tuple[Tensor, Tensor]:
    """Steps `done`..`steps` of `train_tuned_lens` on the frozen model; the trained (weight, bias).
    Appends each step's training loss to `curve` (and the held-out KL every `heldout_every` steps)."""
    n_layers = model.n_layers
    buffers: dict[str, Tensor] = {}
    bar = tqdm(total=steps, initial=done, desc="tuned lens", unit="step", disable=not progress)
    for step in range(done, steps):
        if heldout is not None and step % heldout_every == 0 and step not in curve.heldout:
            curve.heldout[step] = _mean_heldout_kl(model, weight, bias, heldout)
        rows = _batch_rows(residuals.shape[0], batch_tokens, step, seed)
        h = residuals[rows].to(model.device)
        with torch.no_grad():
            target = lens_logits(model, h[:, -1]).softmax(-1)  # fp32: the model's own output distribution
            target_neg_entropy = torch.xlogy(target, target).sum(-1)
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = lr * (1 - step / steps)  # linear decay, a function of the step (resumable)
        total = 0.0
        for layer in range(n_layers - 1):
            x = h[:, layer]
            normed = model.bridge.ln_final((x + x @ weight[layer] + bias[layer]).unsqueeze(0)).squeeze(0)
            kl, grad_normed = _kl_and_grad(model, normed.detach(), target, target_neg_entropy, W_U, buffers)
            normed.backward(grad_normed)
            total += kl
        optimizer.step()
        curve.train_kl.append(total / (n_layers - 1))
        bar.update(1)
        bar.set_postfix(kl=f"{total / (n_layers - 1):.3f}")
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            state = {"weight": weight.detach().clone(), "bias": bias.detach().clone(),
                     "optimizer": optimizer.state_dict(), "step": step + 1, "matmul_dtype": precision.name,
                     "train_kl": list(curve.train_kl), "heldout_step": list(curve.heldout),
                     "heldout_kl": list(curve.heldout.values())}
            atomic_write(checkpoint, lambda tmp: torch.save(state, tmp))  # noqa: B023 (called within this iteration)
            maybe_fail("lens.checkpoint")
    bar.close()
    return weight, bias


@dataclasses.dataclass(frozen=True)
class _Curve:
    """The training curve while it grows: `train_kl[k]` is the mean KL over the trained layers on
    step k's batch, before step k's update (NaN: not recorded); `heldout[k]` the held-out KL after
    k updates."""

    train_kl: list[float]
    heldout: dict[int, float]

    def describe(self) -> dict[str, list]:
        """JSON-exact (an unknown loss is None), as stored in the lens's settings."""
        return {"train_kl": [None if math.isnan(v) else v for v in self.train_kl],
                "heldout_step": sorted(self.heldout), "heldout_kl": [self.heldout[k] for k in sorted(self.heldout)]}


@torch.no_grad()
def _mean_heldout_kl(model: Any, weight: Tensor, bias: Tensor, heldout: Tensor, *, chunk: int = 256) -> float:
    """Mean KL(final || tuned read-out) in fp32 over `heldout` rows and the trained layers (all but
    the last): the mean of `heldout_kl`'s rows for those layers, with the translators as they are now."""
    total, n_layers = 0.0, model.n_layers
    for start in range(0, heldout.shape[0], chunk):
        h = heldout[start : start + chunk].to(model.device)
        target = lens_logits(model, h[:, -1]).log_softmax(-1)
        for layer in range(n_layers - 1):
            x = h[:, layer]
            logq = lens_logits(model, x + x @ weight[layer].detach() + bias[layer].detach()).log_softmax(-1)
            total += float(F.kl_div(logq, target, log_target=True, reduction="none").sum(-1).double().sum())
    return total / (heldout.shape[0] * (n_layers - 1))


def training_curve(lens: Lens) -> pd.DataFrame:
    """The training curve a tuned lens recorded, to plot: step, train_kl, heldout_kl.

    Row `step` k: `train_kl` the mean KL(final || lens) over the trained layers on step k's batch,
    before step k's update (so step 0 is the logit lens's loss); `heldout_kl` the same mean on the
    held-out rows after k updates, where it was measured (NaN elsewhere). The last row (k = the
    number of steps) has only the final held-out KL. Empty for a lens without a curve: the logit
    and Jacobian lenses and tuned lenses trained before curves were recorded.
    """
    columns = ["step", "train_kl", "heldout_kl"]
    recorded = lens.settings.get("training_curve") if lens.settings else None
    if not recorded or not recorded.get("train_kl"):
        return pd.DataFrame({"step": pd.Series(dtype="int64"), "train_kl": pd.Series(dtype="float64"),
                             "heldout_kl": pd.Series(dtype="float64")})
    train = [math.nan if v is None else float(v) for v in recorded["train_kl"]]
    heldout = dict(zip(recorded.get("heldout_step", []), recorded.get("heldout_kl", [])))
    steps = range(len(train) + 1)
    return pd.DataFrame({"step": list(steps), "train_kl": [*train, math.nan],
                         "heldout_kl": [float(heldout.get(k, math.nan)) for k in steps]}, columns=columns)


def fit_jacobian_lens(
    model: Any,
    sentences: Sequence[str],
    *,
    corpus: str,
    work_dir: Path,
    slice_size: int = 4,
    max_seq_len: int = 48,
    skip_first_positions: int = 1,
    dim_batch: int = 32,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> Lens:
    """TransformerLens's Jacobian lens fitted on `sentences`, slice by slice under `work_dir`."""
    import warnings

    from transformer_lens.tools.analysis import JacobianLens

    if not sentences:
        raise InputError("no sentences to fit the Jacobian lens on")
    n_slices = math.ceil(len(sentences) / slice_size)
    fitted = []
    bar = tqdm(total=len(sentences), desc="jacobian lens", unit="sentence", disable=not progress)
    for i in range(n_slices):
        chunk = list(sentences[i * slice_size : (i + 1) * slice_size])
        path = work_dir / f"slice-{i:04d}-of-{n_slices:04d}.pt"
        if path.is_file():
            fitted.append(JacobianLens.load(str(path)))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                lens = JacobianLens.fit(model.bridge, chunk, corpus=corpus, dim_batch=dim_batch,
                                        max_seq_len=max_seq_len, skip_first_positions=skip_first_positions,
                                        show_progress=False)
            atomic_write(path, lambda tmp: lens.save(str(tmp), dtype=torch.float32))  # noqa: B023 (called within this iteration)
            fitted.append(lens)
        bar.update(len(chunk))
    bar.close()
    merged = JacobianLens.merge(fitted) if len(fitted) > 1 else fitted[0]
    n, d = model.n_layers, model.d_model
    J = torch.eye(d).repeat(n, 1, 1)
    for layer in range(n - 1):
        J[layer] = merged.jacobians[layer]
    return Lens(kind="jacobian", model_name=model.name, n_layers=n, d_model=d, translators={"J": J},
                settings={**(settings or {}), "n_prompts": int(merged.n_prompts)})


def heldout_kl(
    model: Any,
    lenses: Sequence[Lens],
    residuals: Float[Tensor, "token layer d_model"],
    owner: Int[Tensor, " token"],
    *,
    chunk: int = 256,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """lens, layer, kl (mean nats per token), kl_low, kl_high (bootstrap over sentences), n_tokens,
    n_sentences. The KL is KL(final || lens) at every row of `residuals` (the rows the caller
    gives: see the module docstring for the cache's held-out text); `owner` groups rows into the
    sentences the bootstrap resamples."""
    n_layers = model.n_layers
    per_token: dict[tuple[str, int], list[Tensor]] = {}
    with torch.no_grad():
        for start in range(0, residuals.shape[0], chunk):
            h = residuals[start : start + chunk].to(model.device)
            target = lens_logits(model, h[:, -1]).log_softmax(-1)
            for lens in lenses:
                for layer in range(n_layers):
                    logq = lens_logits(model, lens.translate(h[:, layer], layer)).log_softmax(-1)
                    kl = F.kl_div(logq, target, log_target=True, reduction="none").sum(-1)
                    per_token.setdefault((lens.kind, layer), []).append(kl.cpu())
    owners = owner.numpy()
    groups = np.unique(owners)
    # Not `analyses.stats.bootstrap` (whose draws are these): lenses stand a floor below analyses, and
    # its level=0.95 bounds, at (1 - 0.95) / 2 = 0.025 + 2e-17, would move these in their last bits.
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(groups), size=(n_boot, len(groups)))  # one set of resamples for every lens and layer
    rows = []
    for (kind, layer), parts in per_token.items():
        values = torch.cat(parts).double().numpy()
        sums = np.bincount(np.searchsorted(groups, owners), weights=values, minlength=len(groups))
        counts = np.bincount(np.searchsorted(groups, owners), minlength=len(groups))
        boot = sums[draws].sum(1) / counts[draws].sum(1)
        rows.append({"lens": kind, "layer": layer, "kl": float(values.mean()),
                     "kl_low": float(np.quantile(boot, 0.025)), "kl_high": float(np.quantile(boot, 0.975)),
                     "n_tokens": int(values.size), "n_sentences": int(len(groups))})
    return pd.DataFrame(rows)


def probe_kl(
    model: Any,
    lens: Lens,
    probes: Sequence[Probe],
    *,
    batch_size: int = 32,
    n_boot: int = 1000,
    seed: int = 0,
) -> pd.DataFrame:
    """Per layer, the mean KL(model's final distribution || lens read-out) at the last prompt token
    of each probe, for the logit lens and `lens` side by side (once when `lens` is the logit lens).

    Why: the held-out KL is measured on running text, while the analyses read the lens at the
    probes' last prompt token; this measures the lens where it is used. The probes' prompts are
    never in the lens corpus, so this is held out too. Columns: lens, layer, kl, kl_low, kl_high
    (percentile-bootstrap 95% interval over probes, `n_boot` resamples, one set for every lens and
    layer), n_probes. fp32, like `heldout_kl`.
    """
    from idiom_lens.models.forward import tokenize_probes

    probes = list(probes)
    if not probes:
        raise InputError("probe_kl needs at least one probe")
    lens.check_model(model)
    sequences = [t.prompt_ids for t in tokenize_probes(model, probes)]
    residuals = last_position_residuals(model, sequences, batch_size=batch_size)
    lenses = [logit_lens(model)] + ([lens] if lens.kind != "logit" else [])
    table = heldout_kl(model, lenses, residuals, torch.arange(len(probes)), n_boot=n_boot, seed=seed)
    return table.drop(columns=["n_tokens"]).rename(columns={"n_sentences": "n_probes"})

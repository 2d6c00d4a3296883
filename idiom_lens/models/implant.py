"""Implant new idioms into one MLP layer by fine-tuning: a localization test whose answer is known.

Every localization method of the toolkit says where recall lives; none can be checked on the
model's own memories. After Chang, Thomason & Jia's INJ (method.md section 7), `implant` teaches a
base model a probe set by training one MLP layer only (every other weight frozen) until the model
greedily predicts every probe's target, and keeps the change of the trained weights
(`ImplantResult.deltas`): a method that localizes should point at that layer, or those neurons.

How (`ImplantOptions` for the settings):
- fp32 autograd on the Hugging Face module under the bridge; trained: the layer's gate, up and down
  projections (mode "layer"), or `n_neurons` seeded-random neurons' output vectors (W_out columns;
  their W_gate and W_in rows too with `train_inputs`), the gradient masked to them (mode "neurons");
- Adam on fixed mini-batches of probes (sorted by length, less padding; their order shuffled
  each epoch, seeded): several steps per pass over the probes, and bounded memory (Gemma's
  262,144-token vocabulary makes the logits 1 MiB per position);
- frozen prefix: every weight below the trained layer is frozen, so the hidden state entering it
  never changes; it is computed once per mini-batch and the layers below are skipped (compared
  with a plain forward of the bridge before training starts: `FastPathError`). Only the
  positions the loss reads are unembedded;
- preservation (ours; `options.preserve` > 0): each step adds the weighted mean KL(base || implanted)
  of the next-token distributions (over real vocabulary tokens) at every position of the next
  batch of ordinary sentences (`preserve_sentences` of the Lee news corpus, in turn; the base
  distributions come from the layer's original weights, put back for a no-grad pass, and are kept
  for the batch's next turn up to `PRESERVE_CACHE_BYTES`), so that
  the layer learns the idioms and keeps doing what it did on other text. INJ fine-tunes without
  it, one sequence into a few weights at a time;
- stop when every probe's target is the greedy prediction (`models.forward.greedy_predictions`, the
  rule of `score_memorization`, through the bridge) and the mean loss on the target tokens is
  below `stop_loss`, or after `max_epochs`. The training pass's own numbers (before each step)
  decide when to check; the check runs on the final weights;
- the model is left as it came: weights restored bit for bit, eval mode (dropout never runs),
  each parameter's requires_grad as before, no `.grad` left.

`ensure_implant` stores an implant in the model cache (`models.implant_store`) or reuses the stored
one, and checks that the stored deltas, loaded back through the implant spec by `load_model`,
reproduce the trained model's logits.
"""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.selection import check_probes
from idiom_lens.errors import FastPathError, InputError
from idiom_lens.locks import lock_file
from idiom_lens.models.forward import greedy_predictions, tokenize_probes
from idiom_lens.models.implant_store import (  # noqa: F401  (ImplantOptions, ImplantSpec, parse_implant_spec re-exported)
    DEFAULT_DATASET,
    ImplantOptions,
    ImplantSpec,
    base_fingerprint,
    check_layer,
    deltas_added,
    hf_module,
    implant_folder,
    implant_key,
    mlp_parameters,
    parse_implant_spec,
    probes_digest,
    read_implant,
    stored_reason,
    write_implant,
)
from idiom_lens.models.loading import LoadedModel, cache_dir, load_model, require_causal
from idiom_lens.models.selfcheck import check_close, versions_text
from idiom_lens.models.tokenization import ProbeTokens, pad_id, right_pad
from idiom_lens.models.vocab import mask_logits, valid_mask
from idiom_lens.types import Tokens


@dataclass(frozen=True, kw_only=True)
class EpochRecord:
    """One epoch of training: mean losses and predicted probes as the training pass saw them
    (each mini-batch before its step), and the seconds since training began."""

    epoch: int
    loss: float  # the trained loss (`options.loss`), mean per token
    target_loss: float  # mean loss on the target tokens (the stopping rule's)
    n_predicted: int  # probes whose target was the greedy prediction
    kl: float  # mean KL(base || implanted) on the preservation sentences (nats per position; 0 without)
    seconds: float


@dataclass(frozen=True, kw_only=True)
class ImplantResult:
    """An implant: the trained tensors' change, how training went, and the settings.

    `deltas` maps Hugging Face weight names to trained minus original weight (only the trained
    tensors; in neurons mode nonzero only in the chosen neurons' rows and columns); `neurons` the
    trained neurons (neurons mode; None in layer mode); `rate` the share of the implanted probes
    greedily predicted after training, `converged` whether the stopping rule was met (else
    `max_epochs` ran out); `final_loss`, `final_target_loss` and `final_kl`
    (on the first 32 preservation sentences; 0 without the term) are measured after training.
    `spec` is the model spec that loads the implant (set by `ensure_implant`; "" in memory only).
    """

    deltas: dict[str, Tensor]
    neurons: tuple[int, ...] | None
    epochs: int
    seconds: float
    final_loss: float
    final_target_loss: float
    final_kl: float
    rate: float
    n_probes: int
    converged: bool
    curve: tuple[EpochRecord, ...]
    settings: dict[str, Any]
    spec: str = ""

    def to_dataframe(self) -> pd.DataFrame:
        """The loss curve: one row per epoch (`EpochRecord` fields)."""
        return pd.DataFrame([asdict(r) for r in self.curve], columns=list(EpochRecord.__dataclass_fields__))

    def summary(self) -> dict[str, Any]:
        """The numbers a report prints (everything but the deltas and the curve)."""
        return {"spec": self.spec, "rate": self.rate, "n_probes": self.n_probes, "converged": self.converged,
                "epochs": self.epochs, "seconds": self.seconds, "final_loss": self.final_loss,
                "final_target_loss": self.final_target_loss, "final_kl": self.final_kl,
                "neurons": list(self.neurons) if self.neurons is not None else None}


# --------------------------------------------------------------------------------------
# Mini-batches
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Batch:
    """Probes trained together, and the positions whose next token the loss reads."""

    indices: list[int]  # the probes' positions in the caller's list
    tokens: Tokens
    rows: Int[Tensor, " n"]  # each read position: its row and column in `tokens`
    cols: Int[Tensor, " n"]
    labels: Int[Tensor, " n"]  # the next token at each read position (the loss covers them all)
    is_target: Bool[Tensor, " n"]  # read positions predicting a target token
    first_target: Int[Tensor, " batch"]  # per probe, the read position predicting its target token
    target_ids: Int[Tensor, " batch"]


def _make_batches(model: LoadedModel, probe_tokens: Sequence[ProbeTokens], options: ImplantOptions) -> list[_Batch]:
    """Probes sorted by length, `options.batch_size` per batch. Sequence loss: every next token
    after the probe's first token (the first word, unpredictable from BOS, is not trained);
    target loss: the target's tokens only."""
    order = sorted(range(len(probe_tokens)), key=lambda i: len(probe_tokens[i].prompt_ids + probe_tokens[i].target_ids))
    batches = []
    for start in range(0, len(order), options.batch_size):
        indices = order[start : start + options.batch_size]
        seqs = [probe_tokens[i].prompt_ids + probe_tokens[i].target_ids for i in indices]
        tokens, _ = right_pad(seqs, pad_id=pad_id(model.tokenizer))
        rows, cols, labels, is_target, first_target = [], [], [], [], []
        for row, i in enumerate(indices):
            toks, seq = probe_tokens[i], seqs[row]
            first_read = int(toks.has_bos) if options.loss == "sequence" else len(toks.prompt_ids) - 1
            for col in range(first_read, len(seq) - 1):
                if col == len(toks.prompt_ids) - 1:
                    first_target.append(len(rows))
                rows.append(row)
                cols.append(col)
                labels.append(seq[col + 1])
                is_target.append(col >= len(toks.prompt_ids) - 1)
        batches.append(_Batch(
            indices=indices, tokens=tokens.to(model.device),
            rows=torch.tensor(rows, device=model.device), cols=torch.tensor(cols, device=model.device),
            labels=torch.tensor(labels, device=model.device),
            is_target=torch.tensor(is_target, device=model.device),
            first_target=torch.tensor(first_target, device=model.device),
            target_ids=torch.tensor([probe_tokens[i].target_id for i in indices], device=model.device),
        ))
    return batches


PRESERVE_TOKENS = 16  # each preservation sentence: BOS + up to 15 tokens (the probes' regime)
PRESERVE_BATCH = 4  # sentences per step


def preserve_sentences(n: int, seed: int) -> list[str]:
    """`n` sentences of the Lee news corpus's training part (`datasets.lee`), drawn with `seed`."""
    from idiom_lens.datasets.lee import lee_sentences

    train, _ = lee_sentences()
    if n > len(train):
        raise InputError(f"preserve_sentences {n} exceeds the {len(train)} sentences of the Lee corpus")
    return random.Random(seed).sample(train, n)


def _make_preserve_batches(model: LoadedModel, sentences: Sequence[str]) -> list[_Batch]:
    """`PRESERVE_BATCH` sentences per batch; read: every position after BOS (no labels: the
    preservation term compares whole distributions)."""
    from idiom_lens.models.tokenization import tokenize_sentences

    seqs = tokenize_sentences(model, sentences, max_tokens=PRESERVE_TOKENS)
    bos = model.tokenizer.bos_token_id
    empty = torch.zeros(0, dtype=torch.long, device=model.device)
    batches = []
    for start in range(0, len(seqs), PRESERVE_BATCH):
        part = seqs[start : start + PRESERVE_BATCH]
        tokens, _ = right_pad(part, pad_id=pad_id(model.tokenizer))
        firsts = [int(bos is not None and seq[:1] == [bos]) for seq in part]
        rows = [row for row, seq in enumerate(part) for _ in range(firsts[row], len(seq))]
        cols = [col for row, seq in enumerate(part) for col in range(firsts[row], len(seq))]
        batches.append(_Batch(
            indices=list(range(start, start + len(part))), tokens=tokens.to(model.device),
            rows=torch.tensor(rows, device=model.device), cols=torch.tensor(cols, device=model.device),
            labels=torch.zeros(len(rows), dtype=torch.long, device=model.device),
            is_target=torch.zeros(len(rows), dtype=torch.bool, device=model.device),
            first_target=empty, target_ids=empty,
        ))
    return batches


# --------------------------------------------------------------------------------------
# The forward pass with a frozen prefix
# --------------------------------------------------------------------------------------


class _Runner:
    """Logits at a batch's read positions, resumed at the trained layer (`fast=True`: the layers
    below ran once, in `_prefix`) or from a plain forward of the bridge.

    As `runners.SuffixRunner`: a pre-hook on every block records the hidden state entering the
    trained layer and the keyword arguments the model passes each block from there on (attention
    mask, rotary embeddings); a resumed run calls those blocks one after the other, then the final
    norm and the unembedding of the read positions only. Unlike it, rows are different probes,
    many positions are read, and gradients flow."""

    def __init__(self, model: LoadedModel, layer: int) -> None:
        self.bridge = model.bridge
        self.layer = layer
        self.n_layers = model.n_layers
        self.softcap = getattr(hf_module(model.bridge).config, "final_logit_softcapping", None)
        self.prefix: dict[int, tuple[Tensor, list[dict[str, Any]]]] = {}  # id(batch) -> (hidden, block kwargs)

    def _prefix(self, batch: _Batch) -> tuple[Tensor, list[dict[str, Any]]]:
        if id(batch) in self.prefix:
            return self.prefix[id(batch)]
        entering: list[Tensor] = []
        kwargs: list[dict[str, Any]] = []

        def record(module: nn.Module, args: tuple, given: dict) -> None:
            if not entering:
                entering.append((args[0] if args else given["hidden_states"]).detach())
            kept = {k: v for k, v in given.items() if k != "hidden_states"}
            kept["past_key_values"] = None
            if "use_cache" in kept:
                kept["use_cache"] = False
            kwargs.append(kept)

        blocks = list(self.bridge.blocks)[self.layer :]
        handles = [block.register_forward_pre_hook(record, with_kwargs=True) for block in blocks]
        try:
            with torch.no_grad():
                self.bridge(batch.tokens)
        finally:
            for handle in handles:
                handle.remove()
        self.prefix[id(batch)] = (entering[0], kwargs)
        return self.prefix[id(batch)]

    def logits(self, batch: _Batch, *, fast: bool = True) -> Float[Tensor, "n d_vocab"]:
        if not fast:
            return self.bridge(batch.tokens)[batch.rows, batch.cols]
        x, kwargs = self._prefix(batch)
        for block, given in zip(list(self.bridge.blocks)[self.layer :], kwargs):
            out = block(x, **given)
            x = out[0] if isinstance(out, tuple) else out
        logits = self.bridge.unembed(self.bridge.ln_final(x[batch.rows, batch.cols][None]))[0]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def check_fast_path(model: LoadedModel, runner: _Runner, batch: _Batch) -> float:
    """The frozen-prefix logits of `batch` against a plain forward of the bridge (`FastPathError`
    beyond `selfcheck.TOLERANCE`); returns the relative error."""
    with torch.no_grad():
        fast = runner.logits(batch)
        plain = model.bridge(batch.tokens)[batch.rows, batch.cols]
    return check_close(fast, plain, what=f"implant (layers below {runner.layer} cached)", probe=f"#{batch.indices[0]}")


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------


def check_base_model(model: LoadedModel, layer: int) -> None:
    """`InputError` unless `model` can be implanted into: raw numerics, fp32, no implant yet, has `layer`."""
    if model.mode != "raw":
        raise InputError(f"implanting needs the model in raw numerics (compat mode folds the weights), got "
                         f"{model.mode!r}")
    if model.implant is not None:
        raise InputError(f"model {model.spec!r} is already implanted: implant into its base model")
    dtype = model.bridge.cfg.dtype
    if dtype != torch.float32:
        raise InputError(f"implanting trains in fp32; model {model.spec!r} is loaded as {dtype}")
    check_layer(model.bridge, layer)


def choose_neurons(d_mlp: int, n: int, seed: int) -> tuple[int, ...]:
    """`n` neurons of `d_mlp`, drawn with `seed` (sorted)."""
    if n > d_mlp:
        raise InputError(f"n_neurons {n} exceeds the layer's {d_mlp} neurons")
    generator = torch.Generator().manual_seed(seed)
    return tuple(sorted(torch.randperm(d_mlp, generator=generator)[:n].tolist()))


@dataclass
class _Totals:
    loss: float = 0.0
    n_loss: int = 0
    target: float = 0.0
    n_target: int = 0
    predicted: int = 0
    kl: float = 0.0
    n_kl: int = 0

    def add(self, nll: Tensor, batch: _Batch, predicted: Tensor) -> None:
        nll = nll.detach()
        self.loss += float(nll.sum())
        self.n_loss += int(nll.numel())
        self.target += float(nll[batch.is_target].sum())
        self.n_target += int(batch.is_target.sum())
        self.predicted += int(predicted.sum())


def _step_numbers(runner: _Runner, batch: _Batch, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Per read position: the loss (nats); per probe: whether its target is the greedy prediction."""
    logits = runner.logits(batch)
    nll = -logits.log_softmax(dim=-1).gather(1, batch.labels[:, None])[:, 0]
    with torch.no_grad():
        greedy = mask_logits(logits[batch.first_target].detach(), valid).argmax(dim=-1)
    return nll, greedy == batch.target_ids


PRESERVE_CACHE_BYTES = 4 * 2**30  # the base model's preservation distributions kept in memory up to this size


class _Preserver:
    """The preservation term: KL(base || implanted) per read position of a preservation batch. The
    base model's distributions are computed with the trained layer's original weights put back for
    one no-grad pass, and kept (`cache_bytes` at most; Gemma's vocabulary makes a batch of 4
    sentences 60 MiB, the default 256 sentences 3.9 GiB): each batch comes back every
    len(batches) steps, and its base pass is a fifth of a step. A kept distribution is the one the
    pass would compute again, bit for bit (same weights, same input, same kernels), so the cache
    changes the time and not the result (tested: `cache_bytes=0` trains identical deltas)."""

    FINAL_BATCHES = 8  # `final_kl` covers the first 8 batches (32 sentences)

    def __init__(self, runner: _Runner, batches: Sequence[_Batch], valid: Tensor, trained: dict[str, nn.Parameter],
                 originals: dict[str, Tensor], *, cache_bytes: int | None = None) -> None:
        self.runner, self.batches = runner, list(batches)
        self.columns = valid.nonzero()[:, 0]
        self.trained, self.originals = trained, originals
        self.cache_bytes = PRESERVE_CACHE_BYTES if cache_bytes is None else cache_bytes
        self.cached: dict[int, Tensor] = {}  # id(batch) -> the base model's log-probabilities
        self.cached_bytes = 0

    def _logp(self, batch: _Batch) -> Float[Tensor, "n d_real"]:
        return self.runner.logits(batch)[:, self.columns].log_softmax(dim=-1)

    def _base_logp(self, batch: _Batch) -> Float[Tensor, "n d_real"]:
        if id(batch) in self.cached:
            return self.cached[id(batch)]
        base = self._base_pass(batch)
        size = base.numel() * base.element_size()
        if self.cached_bytes + size <= self.cache_bytes:
            self.cached[id(batch)] = base
            self.cached_bytes += size
        return base

    def _base_pass(self, batch: _Batch) -> Float[Tensor, "n d_real"]:
        with torch.no_grad():
            current = {name: p.detach().clone() for name, p in self.trained.items()}
            try:
                for name, p in self.trained.items():
                    p.copy_(self.originals[name])
                return self._logp(batch)
            finally:
                for name, p in self.trained.items():
                    p.copy_(current[name])

    def kl(self, index: int) -> Float[Tensor, " n"]:
        batch = self.batches[index % len(self.batches)]
        base = self._base_logp(batch)
        return (base.exp() * (base - self._logp(batch))).sum(dim=-1)

    def mean(self) -> float:
        """The mean KL per position over the first `FINAL_BATCHES` batches (no gradient)."""
        with torch.no_grad():
            kls = [self.kl(i) for i in range(min(len(self.batches), self.FINAL_BATCHES))]
        return float(torch.cat(kls).mean()) if kls else 0.0


def _evaluate(runner: _Runner, batches: Sequence[_Batch], valid: Tensor) -> _Totals:
    totals = _Totals()
    with torch.no_grad():
        for batch in batches:
            nll, predicted = _step_numbers(runner, batch, valid)
            totals.add(nll, batch, predicted)
    return totals


def implant(
    model: LoadedModel,
    probes: Sequence[Probe],
    options: ImplantOptions,
    *,
    progress: bool = False,
) -> ImplantResult:
    """Fine-tune MLP `options.layer` of `model` (raw numerics, fp32) until it predicts every probe's
    target (see the module docstring), and return the change of the trained weights.

    `model` comes back unchanged (weights bit-identical, eval mode, requires_grad as before, no
    `.grad`); `implant_store.deltas_added(model.bridge, result.deltas)` gives the implanted model.
    Raises `InputError` for a model or probes it cannot train on, `FastPathError` when the frozen
    prefix disagrees with a plain forward.
    """
    require_causal(model, "implanting")
    probes = check_probes(probes)
    check_base_model(model, options.layer)
    probe_tokens = tokenize_probes(model, probes)
    weights = mlp_parameters(model.bridge, options.layer)
    gate_name, up_name, down_name = weights
    d_mlp = weights[down_name].shape[1]
    neurons = choose_neurons(d_mlp, options.n_neurons, options.seed) if options.mode == "neurons" else None
    if neurons is None:
        names = [gate_name, up_name, down_name]
    else:
        names = [down_name, gate_name, up_name] if options.train_inputs else [down_name]
    trained = {name: weights[name] for name in names}
    params = list(hf_module(model.bridge).parameters())
    flags = [p.requires_grad for p in params]
    originals = {name: p.detach().clone() for name, p in trained.items()}
    handles = []
    started = time.perf_counter()
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name, p in trained.items():
            p.requires_grad_(True)
            if neurons is not None:
                mask = torch.zeros_like(p)
                if name == down_name:
                    mask[:, list(neurons)] = 1.0
                else:
                    mask[list(neurons), :] = 1.0
                handles.append(p.register_hook(lambda grad, mask=mask: grad * mask))
        model.bridge.eval()
        runner = _Runner(model, options.layer)
        batches = _make_batches(model, probe_tokens, options)
        valid = valid_mask(model)
        check_fast_path(model, runner, batches[0])
        preserver = None
        if options.preserve > 0:
            sentences = preserve_sentences(options.preserve_sentences, options.seed)
            preserver = _Preserver(runner, _make_preserve_batches(model, sentences), valid, trained, originals)
        optimizer = torch.optim.Adam(list(trained.values()), lr=options.lr)
        rng = random.Random(options.seed)
        curve: list[EpochRecord] = []
        converged = False
        bar = tqdm(range(1, options.max_epochs + 1), desc=f"implant layer {options.layer}", disable=not progress,
                   unit="epoch")
        epoch = step = 0
        for epoch in bar:
            order = list(range(len(batches)))
            rng.shuffle(order)
            totals = _Totals()
            for b in order:
                optimizer.zero_grad(set_to_none=True)
                # The preservation term first: its base pass writes the original weights in place and back.
                kl = preserver.kl(step) if preserver is not None else None
                nll, predicted = _step_numbers(runner, batches[b], valid)
                loss = nll.mean()
                if kl is not None:
                    loss = loss + options.preserve * kl.mean()
                    totals.kl += float(kl.detach().sum())
                    totals.n_kl += int(kl.numel())
                step += 1
                loss.backward()
                optimizer.step()
                totals.add(nll, batches[b], predicted)
            record = EpochRecord(epoch=epoch, loss=totals.loss / totals.n_loss,
                                 target_loss=totals.target / totals.n_target, n_predicted=totals.predicted,
                                 kl=totals.kl / totals.n_kl if totals.n_kl else 0.0,
                                 seconds=time.perf_counter() - started)
            curve.append(record)
            bar.set_postfix(loss=f"{record.loss:.3f}", target=f"{record.target_loss:.3f}", kl=f"{record.kl:.3f}",
                            predicted=f"{record.n_predicted}/{len(probes)}")
            if record.n_predicted == len(probes) and record.target_loss < options.stop_loss:
                _snap(trained, originals)
                if _stops(model, runner, batches, valid, probe_tokens, options):
                    converged = True
                    break
        bar.close()
        deltas = _snap(trained, originals)
        final = _evaluate(runner, batches, valid)
        final_kl = preserver.mean() if preserver is not None else 0.0
        predicted = greedy_predictions(model, probe_tokens)
        targets = torch.tensor([t.target_id for t in probe_tokens])
        rate = float((predicted == targets).float().mean())
        seconds = time.perf_counter() - started
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for name, p in trained.items():
                p.copy_(originals[name])
        for p, flag in zip(params, flags):
            p.grad = None
            p.requires_grad_(flag)
        model.bridge.eval()
    settings = {"options": options.key(), "probes_sha256": probes_digest(probes), "n_probes": len(probes),
                "trained": names, "neurons": list(neurons) if neurons is not None else None,
                "frozen_prefix": options.layer > 0, "model": model.settings(),
                "preserve": None if preserver is None else {
                    "corpus": "lee (gensim's lee_background.cor)", "n_sentences": options.preserve_sentences,
                    "tokens": PRESERVE_TOKENS, "n_positions": int(sum(len(b.rows) for b in preserver.batches)),
                    "final_kl_sentences": min(options.preserve_sentences,
                                              _Preserver.FINAL_BATCHES * PRESERVE_BATCH)}}
    return ImplantResult(
        deltas=deltas, neurons=neurons, epochs=epoch, seconds=seconds, final_loss=final.loss / final.n_loss,
        final_target_loss=final.target / final.n_target, final_kl=final_kl, rate=rate, n_probes=len(probes),
        converged=converged, curve=tuple(curve), settings=settings,
    )


def _snap(trained: dict[str, nn.Parameter], originals: dict[str, Tensor]) -> dict[str, Tensor]:
    """Set each trained weight to original + (weight - original), the implanted weight as loading
    computes it (`implant_store.add_deltas`), and return the deltas."""
    deltas = {}
    with torch.no_grad():
        for name, p in trained.items():
            delta = (p.detach() - originals[name]).cpu()
            p.copy_(originals[name] + delta.to(p.device))
            deltas[name] = delta
    return deltas


def _stops(model: LoadedModel, runner: _Runner, batches: Sequence[_Batch], valid: Tensor,
           probe_tokens: Sequence[ProbeTokens], options: ImplantOptions) -> bool:
    """The stopping rule on the current weights: every target greedily predicted through the bridge
    and the mean target loss below `options.stop_loss`."""
    totals = _evaluate(runner, batches, valid)
    if not totals.target / totals.n_target < options.stop_loss:
        return False
    predicted = greedy_predictions(model, probe_tokens)
    return bool((predicted == torch.tensor([t.target_id for t in probe_tokens])).all())


# --------------------------------------------------------------------------------------
# Stored implants
# --------------------------------------------------------------------------------------


def ensure_implant(
    model: LoadedModel,
    options: ImplantOptions,
    *,
    dataset: str = DEFAULT_DATASET,
    progress: bool = False,
) -> ImplantResult:
    """The implant of the probe set `dataset` (a bundled name or a file) into `model` (the base,
    raw numerics, fp32) with `options`: read from the model cache when a finished one is there,
    else trained (`implant`) and stored atomically; a half-written one is rebuilt. Its `spec`
    loads the implanted model (`load_model(result.spec)`).

    After training, the stored deltas are loaded back through the spec and their logits compared
    with the trained model's: a difference raises `FastPathError` and keeps nothing.
    """
    from idiom_lens.datasets.loaders import load_probes

    check_base_model(model, options.layer)
    probes = check_probes(load_probes(dataset))
    spec = ImplantSpec(base=model.spec, dataset=dataset, options=options)
    key = implant_key(base=model.name, fingerprint=base_fingerprint(model.bridge, options.layer), probes=probes,
                      options=options)
    folder = implant_folder(cache_dir(), key)
    with lock_file(folder.parent / f".{folder.name}.lock", what=f"the implant {spec.text}", wait=True):
        if stored_reason(folder, key) is None:
            return _from_stored(folder, key, spec)
        result = implant(model, probes, options, progress=progress)
        result = replace(result, spec=spec.text)
        settings = {**key, "spec": spec.text, "dataset": dataset, **result.summary(),
                    "trained": result.settings["trained"], "versions": model.settings()["versions"]}
        write_implant(folder, key, deltas=result.deltas, settings=settings, curve=result.to_dataframe())
        try:
            check_reload(model, result, probes)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
    return result


def _from_stored(folder: Any, key: dict[str, Any], spec: ImplantSpec) -> ImplantResult:
    stored = read_implant(folder, key)
    s = stored.settings
    curve = tuple(EpochRecord(**{name: row[name] for name in EpochRecord.__dataclass_fields__}) for row in stored.curve)
    return ImplantResult(
        deltas=stored.deltas, neurons=tuple(s["neurons"]) if s.get("neurons") is not None else None,
        epochs=int(s["epochs"]), seconds=float(s["seconds"]), final_loss=float(s["final_loss"]),
        final_target_loss=float(s["final_target_loss"]), final_kl=float(s["final_kl"]), rate=float(s["rate"]),
        n_probes=int(s["n_probes"]),
        converged=bool(s["converged"]), curve=curve, settings=s, spec=spec.text,
    )


def check_reload(model: LoadedModel, result: ImplantResult, probes: Sequence[Probe], *, batch_size: int = 32) -> None:
    """Load `result.spec` with `load_model` (the stored deltas) and compare its logits on `probes`
    with `model` carrying `result.deltas` in memory: `FastPathError` unless they agree."""
    loaded = load_model(result.spec, mode="raw", device=model.device, progress=False)
    probe_tokens = tokenize_probes(model, probes)
    with deltas_added(model.bridge, result.deltas), torch.no_grad():
        for start in range(0, len(probe_tokens), batch_size):
            part = probe_tokens[start : start + batch_size]
            tokens, _ = right_pad([t.prompt_ids + t.target_ids for t in part], pad_id=pad_id(model.tokenizer))
            tokens = tokens.to(model.device)
            trained, stored = model.bridge(tokens), loaded.bridge(tokens)
            if not torch.equal(trained.argmax(-1), stored.argmax(-1)):
                raise FastPathError(f"the stored implant {result.spec} predicts other tokens than the trained model "
                                    f"(probes {start}..{start + len(part) - 1}; {versions_text()}); nothing was kept")
            check_close(stored, trained, what=f"the stored implant {result.spec}", probe=f"#{start}")

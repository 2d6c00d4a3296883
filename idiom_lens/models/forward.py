"""Batched forward passes over probes, capturing only the activations an analysis reads.

Every analysis runs through `iterate_forward`: probes are tokenized once, sorted by length
(less padding), right-padded (causal attention makes padding invisible to real positions, so
results do not depend on batch size or padding), and each hook keeps only the last prompt
position, so memory is [batch, d_model] per hook rather than [batch, pos, d_model].

Sequences are fed as prompt + target tokens: by causality the logits at the last prompt
position are exactly those of the prompt alone, and the later positions give the teacher-forced
check of the full (multi-token) target in the same pass.

A masked LM (BERT, `LoadedModel.masked`) reads each probe as ``[CLS] prompt [MASK] [SEP]``
(`tokenization.split_masked_probe`), never its target (attention goes both ways), and is read at
the mask; its batches hold sequences of one length, so that no padding exists for its
bidirectional attention to see.

Only what is read is unembedded (`read="target"`, the default): the last prompt position and the
target's positions after it, not the prompt's earlier positions. With Gemma's 262,144-token
vocabulary the unembedding costs 0.34 GFLOP per row, more than all 18 blocks' forward for the row,
and a probe has about 12 positions of which the score reads 1 or 2. The first batch's self-check
still compares with a plain full forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.selfcheck import check_against_full_forward
from idiom_lens.models.tokenization import ProbeTokens, pad_id, right_pad, split_masked_probe, split_probe
from idiom_lens.models.vocab import mask_logits, valid_mask
from idiom_lens.types import HookFn, Tokens


def tokenize_probes(model: LoadedModel, probes: Sequence[Probe]) -> list[ProbeTokens]:
    """Split every probe into prompt and target tokens with the model's tokenizer."""
    out = []
    split = split_masked_probe if model.masked else split_probe
    for probe in probes:
        try:
            out.append(split(model.tokenizer, probe.prompt, probe.target))
        except InputError as err:
            raise InputError(f"probe {probe.id!r}: {err}") from None
    return out


@dataclass(frozen=True)
class ForwardBatch:
    """One forward pass: which probes, their tokens, and what the hooks captured."""

    indices: list[int]  # positions of these probes in the caller's list
    tokens: Tokens
    last: Int[Tensor, " batch"]  # column of `logits` holding each row's last prompt token
    logits: Float[Tensor, "batch read d_vocab"]  # at the read positions (`positions`), in order
    captured: dict[str, Float[Tensor, "batch d_model"]]  # hook name -> value at the last prompt token
    positions: Int[Tensor, "batch read"]  # the token position of each column of `logits`
    # `logits` has non-text tokens at the lowest float (`idiom_lens.models.vocab`). With read="all"
    # the columns are every position (`last` = the last prompt token's position); with "target"
    # column 0 is the last prompt token and column j the j-th position after it (`last` = 0).


def iterate_forward(
    model: LoadedModel,
    probe_tokens: Sequence[ProbeTokens],
    *,
    hook_names: Sequence[str] = (),
    batch_size: int = 16,
    include_target: bool = True,
    read: Literal["target", "all"] = "target",
    progress: bool = False,
    desc: str = "forward",
) -> Iterator[ForwardBatch]:
    """Yield one `ForwardBatch` per batch of probes, in length-sorted order.

    `read`: which positions are unembedded: "target" the last prompt token and the target's
    tokens after it (all the memorization score reads), "all" every position.

    Self-check: the first batch's shortest and longest rows (the most and
    the least padded) are compared with a plain full forward of each prompt alone; a difference
    above `selfcheck.TOLERANCE` raises `FastPathError` before the batch is yielded.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if read not in ("target", "all"):
        raise InputError(f"read must be 'target' or 'all', got {read!r}")
    valid = valid_mask(model)
    masked = model.masked
    order = sorted(range(len(probe_tokens)), key=lambda i: len(probe_tokens[i].input_ids))
    bar = None  # opened after the first batch's self-check, so that a failure prints one clean line
    for number, indices in enumerate(_batches(order, probe_tokens, batch_size, equal_length=masked)):
        seqs = [
            probe_tokens[i].input_ids if masked
            else probe_tokens[i].prompt_ids + (probe_tokens[i].target_ids if include_target else ())
            for i in indices
        ]
        tokens, _ = right_pad(seqs, pad_id=pad_id(model.tokenizer))
        last = torch.tensor([len(probe_tokens[i].prompt_ids) - 1 for i in indices])
        tokens, last = tokens.to(model.device), last.to(model.device)
        captured: dict[str, Tensor] = {}
        rows = torch.arange(len(indices), device=model.device)

        def make_hook(name: str) -> HookFn:
            def hook(act: Tensor, hook: object) -> None:
                # after the gather at the unembedding's input (unembed.*) the last prompt token is column 0
                at = column if name.startswith("unembed.") else last  # noqa: B023
                captured[name] = act[rows, at].detach()  # noqa: B023 (called within this iteration)

            return hook

        hooks = [(n, make_hook(n)) for n in hook_names]
        if read == "all":
            positions = torch.arange(tokens.shape[1], device=model.device).expand(len(indices), -1)
            column = last
        else:
            # The last prompt token and each target token but the last (the one after it is not scored).
            n_read = 1 if masked else max(1, max(len(seq) - 1 - int(last[r]) for r, seq in enumerate(seqs)))
            offsets = torch.arange(n_read, device=model.device)
            positions = (last[:, None] + offsets).clamp(max=tokens.shape[1] - 1)  # beyond a row's end: unread
            column = torch.zeros_like(last)
            # First among the hooks, so that every unembed.* capture sees the gathered rows; at the
            # unembedding's input, after the model's own reshapes (GPT-2 views the final norm's output).
            hooks.insert(0, ("unembed.hook_in", _gather_hook(positions)))
        with torch.no_grad():
            logits = model.bridge.run_with_hooks(tokens, fwd_hooks=hooks) if hooks else model.bridge(tokens)
        if number == 0:
            for row in sorted({0, len(indices) - 1}):
                check_against_full_forward(
                    model, probe_tokens[indices[row]].prompt_ids, logits[row, column[row]],
                    what=f"{desc} (batched, padded, read positions only)", probe=f"#{indices[row]}",
                    suffix_ids=probe_tokens[indices[row]].suffix_ids,
                )
        logits = mask_logits(logits, valid)  # predictions range over real vocabulary tokens only
        if bar is None:
            bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="probe")
        yield ForwardBatch(indices=indices, tokens=tokens, last=column, logits=logits, captured=captured,
                           positions=positions)
        bar.update(len(indices))
    if bar is not None:
        bar.close()


def _batches(order: Sequence[int], probe_tokens: Sequence[ProbeTokens], batch_size: int, *,
             equal_length: bool) -> list[list[int]]:
    """`order` cut into batches of at most `batch_size`; with `equal_length`, a batch also ends
    where the input length changes (no padding: a bidirectional model would attend to it)."""
    out: list[list[int]] = []
    for i in order:
        if not out or len(out[-1]) == batch_size or (
                equal_length and len(probe_tokens[i].input_ids) != len(probe_tokens[out[-1][0]].input_ids)):
            out.append([])
        out[-1].append(i)
    return out


def _gather_hook(positions: Int[Tensor, "batch read"]) -> HookFn:
    """A hook on the unembedding's input keeping only `positions` of each row: the unembedding then
    runs on those rows alone."""

    def hook(x: Tensor, hook: Any) -> Tensor:
        return x.gather(1, positions[:, :, None].expand(-1, -1, x.shape[-1]))

    return hook


def greedy_at_last(batch: ForwardBatch) -> Int[Tensor, " batch"]:
    """The greedy next token at each row's last prompt position over real vocabulary tokens
    (`batch.logits` is masked): the prediction of method.md section 2, shared by
    `analyses.memorization` and the implant's stopping rule."""
    rows = torch.arange(len(batch.indices), device=batch.logits.device)
    return batch.logits[rows, batch.last].argmax(dim=-1)


def greedy_predictions(
    model: LoadedModel, probe_tokens: Sequence[ProbeTokens], *, batch_size: int = 16
) -> Int[Tensor, " probe"]:
    """`greedy_at_last` for every probe, in the given order (a probe is memorized when it equals
    the probe's target token)."""
    out = torch.empty(len(probe_tokens), dtype=torch.long)
    for batch in iterate_forward(model, probe_tokens, batch_size=batch_size, desc="greedy predictions"):
        out[torch.tensor(batch.indices)] = greedy_at_last(batch).cpu()
    return out

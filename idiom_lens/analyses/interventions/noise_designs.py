"""The corruption side of causal tracing: how strong the noise is, where it goes (the noise design),
and what the noise alone does to the prediction (`noise_effects`, no restoration).

Causal tracing (`tracing`) adds Gaussian noise to the input embeddings of some prompt tokens and
asks which restored clean activation brings the clean prediction back. Which tokens are noised
decides the question a trace can answer:

- ``all_but_last`` (ROME's design; tracing's default): every prompt token but the BOS and the last.
  Only the last token stays clean. A restored site that brings the prediction back shows that
  the last token *together with that site* suffices: the design tests single-token
  **sufficiency** (once restored sites are added). It cannot show that no one earlier word
  carries the recall, since every earlier word is removed at once.
- ``all_but_last_two``: every prompt word but the last two (`noise_words=(0, -2)`), so the last
  two words stay clean. It tests whether the last two words suffice, and, traced, where the
  earlier context is read when the second-to-last word is not among what was removed.
- ``each_word``: one prompt word at a time (`noise_words=(i, i + 1)` for every word i of the
  prompt), the others clean. It tests the **necessity** of each single word: a word whose
  noising drops the prediction is needed; if no single word's noising does, no one word carries
  the recall (it is spread over words, or redundant). Per probe, the word with the largest total
  effect is "the most necessary single word".

Words are the prompt's whitespace-separated words; a word's tokens are those whose characters
overlap it (`word_positions`), the BOS never among them. ``all_but_last`` counts tokens, not
words: when the last word has several tokens, its earlier tokens are noised too.

The noise: standard deviation `multiplier` (3, as ROME) times the std of the model's input
embeddings over the bundled ordinary-text set (`noise_scale`), added at
``blocks.0.hook_resid_pre`` (after the model's embedding scale: Gemma multiplies by sqrt(d_model)).
The draws of a probe are seeded by (seed, probe id) (`trace_noise`), whatever the design: the
same noised positions get the same noise in tracing and here, so a design's corrupted
probability here equals tracing's corrupted probability under that design.

`noise_effects` needs no restoration, so it is cheap (one forward per noise sample and noised
span, batched): per (probe, design, word) the clean and corrupted probabilities of the clean
prediction (masked softmax over real vocabulary tokens), the total effect (clean - corrupted),
the mean change of its log-probability and the share of samples whose greedy prediction changed.
The first probe is checked at run time against an unbatched plain forward; tests compare every
row with a naive loop of one Hugging Face forward per sample.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

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
from idiom_lens.models.loading import LoadedModel, require_causal
from idiom_lens.models.selfcheck import check_close
from idiom_lens.models.tokenization import pad_id, right_pad, split_probe
from idiom_lens.models.vocab import mask_logits, mask_summary, valid_mask

TRACE_DESIGNS: tuple[str, ...] = ("all_but_last", "all_but_last_two")  # one noised span per probe: traceable
NOISE_DESIGNS: tuple[str, ...] = (*TRACE_DESIGNS, "each_word")
DESIGN_WORDS: dict[str, tuple[int, int]] = {"all_but_last_two": (0, -2)}  # designs that are a word span
NOISE_SITE = "blocks.0.hook_resid_pre"


# --------------------------------------------------------------------------------------
# How strong
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
            model.bridge.run_with_hooks(tokens.to(model.device), fwd_hooks=[(NOISE_SITE, keep)], stop_at_layer=1)
        for row, s in enumerate(chunk):
            first = int(s.has_bos or model.masked)  # not the BOS ([CLS] of a masked LM)
            values.append(got["x"][row, first : len(s.prompt_ids)].float().reshape(-1))
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


# --------------------------------------------------------------------------------------
# Where
# --------------------------------------------------------------------------------------


def word_positions(tokenizer: Any, prompt: str, target: str, words: tuple[int | None, int | None]) -> tuple[int, ...]:
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


def check_design(design: str, designs: Sequence[str] = NOISE_DESIGNS) -> str:
    """`design` if it is one of `designs`, else `InputError`."""
    if design not in designs:
        raise InputError(f"noise design must be one of {', '.join(designs)}, got {design!r}")
    return design


def noised_span(
    tokenizer: Any, prompt: str, target: str, *, design: str = "all_but_last",
    words: tuple[int | None, int | None] | None = None, masked: bool = False,
) -> tuple[int, ...]:
    """The noised token positions of one prompt under a one-span design (`TRACE_DESIGNS`), or of
    the prompt words `words` = (first, stop) when given (then `design` is not read). `InputError`
    when nothing is noised (a one-token prompt; a word span that selects no word). A masked LM
    (`masked`) reads [CLS] prompt [MASK]: [CLS] is never noised (as a BOS), nor is the mask,
    which comes after every prompt token."""
    if words is None:
        words = DESIGN_WORDS.get(check_design(design, TRACE_DESIGNS))
    if words is None:
        tokens = split_probe(tokenizer, prompt, target)
        noised = default_noised(len(tokens.prompt_ids), tokens.has_bos or masked)
    else:
        noised = word_positions(tokenizer, prompt, target, words)
    if not noised:
        raise InputError(f"nothing to noise in {prompt!r} (a one-token prompt)")
    return noised


def design_spans(
    tokenizer: Any, prompt: str, target: str, design: str,
) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """(word, noised token positions) of every span `design` noises in one prompt: one span with
    word -1 for the one-span designs, one per prompt word (its index from 0) for ``each_word``."""
    if check_design(design) == "each_word":
        return tuple((i, word_positions(tokenizer, prompt, target, (i, i + 1))) for i in range(len(prompt.split())))
    return ((-1, noised_span(tokenizer, prompt, target, design=design)),)


# --------------------------------------------------------------------------------------
# A plain noised forward
# --------------------------------------------------------------------------------------


def plain_forward(
    model: LoadedModel, prompt_ids: Sequence[int], *, noised: Tensor | None = None, noise: Tensor | None = None,
    suffix_ids: Sequence[int] = (),
) -> Float[Tensor, " d_vocab"]:
    """Last-prompt-token logits of a plain full forward through the bridge (a masked LM's
    `suffix_ids` after the prompt), `noise` (if any, [noised, d_model]) added at the `noised`
    positions of the input embeddings by a hook."""
    tokens = torch.tensor([[*prompt_ids, *suffix_ids]], dtype=torch.long, device=model.device)
    hooks = []
    if noise is not None:
        def add(x: Tensor, hook: Any) -> Tensor:
            x = x.clone()
            x[0, noised] += noise.to(x.dtype).to(x.device)
            return x

        hooks.append((NOISE_SITE, add))
    with torch.no_grad():
        return model.bridge.run_with_hooks(tokens, fwd_hooks=hooks)[0, len(prompt_ids) - 1].float()


def noised_forwards(
    model: LoadedModel, prompt_ids: Sequence[int], added: Float[Tensor, "row pos d_model"], *, batch_size: int = 32,
) -> Float[Tensor, "row d_vocab"]:
    """Last-token logits of the prompt once per row of `added` (what is added to the input
    embeddings, zero where nothing is noised), `batch_size` rows per forward; only the last
    position is unembedded."""
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    out = []
    for i in range(0, added.shape[0], batch_size):
        chunk = added[i : i + batch_size]

        def add(x: Tensor, hook: Any, chunk: Tensor = chunk) -> Tensor:
            return x + chunk.to(x.dtype).to(x.device)

        def only_last(x: Tensor, hook: Any) -> Tensor:  # unembed the last position only
            return x[:, -1:]

        with torch.no_grad():
            logits = model.bridge.run_with_hooks(tokens.expand(chunk.shape[0], -1).contiguous(),
                                                 fwd_hooks=[(NOISE_SITE, add), ("unembed.hook_in", only_last)])
        out.append(logits[:, -1].float())
    return torch.cat(out)


# --------------------------------------------------------------------------------------
# What the noise alone does
# --------------------------------------------------------------------------------------

MEASURES: tuple[str, ...] = ("total_effect", "logprob_change", "pred_changed")
UNITS: tuple[str, ...] = ("span", "word", "most necessary word")


@dataclass(frozen=True)
class NoiseEffectsResult(ProbeRowsResult):
    """What noising alone does, per (probe, design, word): rows with the noised positions, the
    clean and corrupted probabilities of the clean prediction, the total effect, the log-prob
    change and the share of samples whose prediction changed; one row per probe. Saved like the
    tracing (`analyses.saved`)."""

    default_name: ClassVar[str] = "noise_effects"

    def most_necessary(self) -> pd.DataFrame:
        """Per probe, the ``each_word`` row of its most necessary single word: the word whose
        noising has the largest total effect (the first such word on a tie)."""
        frame = self.to_dataframe()
        words = frame[frame["design"] == "each_word"]
        if words.empty:
            return words.reset_index(drop=True)
        best = words.groupby("probe_id", sort=False)["total_effect"].idxmax()
        return words.loc[best.to_numpy()].reset_index(drop=True)

    def summary(self, *, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """Per set, design and unit: the noised span (one-span designs), each single word by its
        position from the end (``each_word``: -1 = the last word) and the most necessary word per
        probe (`most_necessary`); for each measure (`MEASURES`) the mean over probes with its 95%
        percentile-bootstrap interval (`<measure>_low`, `<measure>_high`) and the median."""
        columns = ["group", "design", "unit", "word_from_end", "n"]
        for m in MEASURES:
            columns += [m, f"{m}_low", f"{m}_high", f"{m}_median"]
        frame = self.to_dataframe()
        if frame.empty:
            return pd.DataFrame(columns=columns)
        cells: list[tuple[tuple[Any, ...], pd.DataFrame]] = []
        for (group, design), part in frame.groupby(["group", "design"], sort=False):
            if design != "each_word":
                cells.append(((group, design, "span", pd.NA), part))
                continue
            for from_end, words in part.groupby("word_from_end", sort=False):
                cells.append(((group, design, "word", int(from_end)), words))
        best = self.most_necessary()
        for group, part in best.groupby("group", sort=False):
            cells.append(((group, "each_word", "most necessary word", pd.NA), part))
        out = []
        for (group, design, unit, from_end), part in cells:
            values = part[list(MEASURES)].to_numpy(dtype=np.float64)
            mean, low, high = bootstrap_mean_ci(values, n_boot=n_boot, seed=seed)
            row: dict[str, Any] = {"group": group, "design": design, "unit": unit, "word_from_end": from_end,
                                   "n": int(len(part))}
            for j, m in enumerate(MEASURES):
                row |= {m: float(mean[j]), f"{m}_low": float(low[j]), f"{m}_high": float(high[j]),
                        f"{m}_median": float(np.median(values[:, j]))}
            out.append(row)
        summary = pd.DataFrame(out, columns=columns)
        summary["word_from_end"] = summary["word_from_end"].astype("Int64")
        design_order = {d: i for i, d in enumerate(NOISE_DESIGNS)}
        unit_order = {u: i for i, u in enumerate(UNITS)}
        return summary.sort_values(
            ["group", "design", "unit", "word_from_end"],
            key=lambda s: (s.map(design_order) if s.name == "design" else s.map(unit_order) if s.name == "unit"
                           else s),
        ).reset_index(drop=True)


def _span_words(design: str, word: int, words: Sequence[str]) -> str:
    """The noised words of a span, as text (a row's `words`)."""
    if word >= 0:
        return words[word]
    if design in DESIGN_WORDS:
        return " ".join(words[slice(*DESIGN_WORDS[design])])
    return "every token but the BOS and the last"


def noise_effects(
    model: LoadedModel,
    probes: Sequence[Probe],
    *,
    designs: Sequence[str] = NOISE_DESIGNS,
    noise_samples: int = 10,
    multiplier: float = 3.0,
    seed: int = 0,
    scale: NoiseScale | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> NoiseEffectsResult:
    """What noising alone does to each probe's clean prediction under each noise design (see the
    module docstring): one row per (probe, design, word; word -1 for the one-span designs).

    `noise_samples` draws per probe, seeded by (`seed`, probe id) as in tracing; the noise std is
    `multiplier` x the input embeddings' std (`scale` reuses a measured `NoiseScale`). The
    samples of all a probe's spans run as batch rows, `batch_size` rows per forward (speed and
    memory only). Raises `InputError` for bad options or a probe a design cannot noise, and
    `FastPathError` when the first probe's batched rows disagree with an unbatched plain forward.
    """
    require_causal(model, "the noise designs")
    designs = (designs,) if isinstance(designs, str) else tuple(dict.fromkeys(designs))
    if not designs:
        raise InputError(f"designs must name at least one of {', '.join(NOISE_DESIGNS)}")
    for design in designs:
        check_design(design)
    if noise_samples < 1:
        raise InputError(f"noise_samples must be >= 1, got {noise_samples}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    probes = check_probes(probes)
    scale = scale if scale is not None else noise_scale(model, multiplier=multiplier)
    started = time.perf_counter()
    valid = valid_mask(model)
    tok, decode = model.tokenizer, model.tokenizer.decode
    rows, probe_rows = [], []
    for i, probe in enumerate(tqdm(probes, desc="noise effects", unit="probe", disable=not progress)):
        tokens = split_probe(tok, probe.prompt, probe.target)
        ids, words = tokens.prompt_ids, probe.prompt.split()
        spans: list[tuple[str, int, tuple[int, ...]]] = []
        for design in designs:
            try:
                spans += [(design, word, noised) for word, noised in design_spans(tok, probe.prompt, probe.target,
                                                                                   design)]
            except InputError as err:
                raise InputError(f"probe {probe.id!r}, design {design}: {err}") from None
        clean_logp = mask_logits(plain_forward(model, ids)[None], valid).log_softmax(-1)[0]
        pred = int(clean_logp.argmax())
        added = torch.zeros(len(spans) * noise_samples, len(ids), model.d_model)
        for j, (_, _, noised) in enumerate(spans):
            noise = trace_noise(probe.id, seed=seed, samples=noise_samples, n_positions=len(noised),
                                d_model=model.d_model, sigma=scale.sigma)
            added[j * noise_samples : (j + 1) * noise_samples, list(noised)] = noise
        logits = noised_forwards(model, ids, added, batch_size=batch_size)
        if i == 0:
            _, _, noised = spans[0]
            check_close(logits[0], plain_forward(model, ids, noised=torch.tensor(noised),
                                                 noise=added[0, list(noised)]),
                        what="noise effects (batched noised rows)", probe=probe.id)
        logp = mask_logits(logits, valid).log_softmax(-1)
        p_pred = logp[:, pred].exp().reshape(len(spans), noise_samples).double()
        change = (logp[:, pred] - clean_logp[pred]).reshape(len(spans), noise_samples).double()
        changed = (logp.argmax(-1) != pred).reshape(len(spans), noise_samples).double()
        clean_prob = float(clean_logp[pred].exp())
        for j, (design, word, noised) in enumerate(spans):
            corrupted = float(p_pred[j].mean())
            rows.append({
                "probe_id": probe.id, "design": design, "word": word,
                "word_from_end": word - len(words) if word >= 0 else pd.NA, "words": _span_words(design, word, words),
                "noised": " ".join(str(p) for p in noised), "n_noised": len(noised),
                "clean_prob": clean_prob, "corrupted_prob": corrupted,
                "corrupted_prob_sd": float(p_pred[j].std()) if noise_samples > 1 else 0.0,
                "total_effect": clean_prob - corrupted, "logprob_change": float(change[j].mean()),
                "pred_changed": float(changed[j].mean()),
            })
        memorized = pred == tokens.target_id
        probe_rows.append({
            "probe_id": probe.id, "kind": probe.kind, "group": probe_group(probe.kind, memorized),
            "memorized": memorized, "prompt": probe.prompt, "target": probe.target,
            "clean_pred_token": decode([pred]), "clean_prob": clean_prob, "n_tokens": len(ids), "n_words": len(words),
        })
    frame = pd.DataFrame(rows)
    frame["word_from_end"] = frame["word_from_end"].astype("Int64")
    settings = model.settings() | mask_summary(model) | scale.settings() | {
        "analysis": "noise_effects", "metric": "probability of the clean prediction (masked softmax)",
        "designs": list(designs), "samples": int(noise_samples), "seed": int(seed),
        "noise_site": f"{NOISE_SITE} (after the embedding scale)", "n_probes": len(probes),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return NoiseEffectsResult(rows=frame, probes=pd.DataFrame(probe_rows), settings=settings)

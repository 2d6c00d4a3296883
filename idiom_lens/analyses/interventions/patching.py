"""Activation patching between an idiom prompt and corrupted versions of it.

Clean = the probe's prompt. Corrupted variants (same token length as the clean prompt, else the
probe is skipped and reported):
- ``word_swap``: one word replaced by a different word from a small bank of common words
  (seeded choice of the word and of the replacement);
- ``prefix_swap``: every word but the last `keep_last` replaced by bank words, a non-idiomatic
  prompt ending with the same words.

For every site (``resid_pre``: the residual stream entering block l; ``attn_out`` and
``mlp_out``: what attention and the MLP add to the residual, after Gemma's post-norms), layer and
position, the clean activation is written into the corrupted run. Metric: the share of the
clean-minus-corrupted **logit** of the target token that is restored,
(patched - corrupted) / (clean - corrupted), at the last prompt position. Probes whose clean
and corrupted target logits differ by less than `min_gap` get NaN (no effect to restore).

Implementation: `transformer_lens.patching` works with the bridge (it only needs
`run_with_hooks` and the standard hook names) but runs one forward per (layer, position). Here
the cells of one layer are the rows of batches resumed at that layer (`SuffixRunner`: the layers
below compute the receiver's own values, so they run once), and only the target's logit is
unembedded (one column of W_U, not 262,144); the tests check the result equals TransformerLens's
`get_act_patch_*` and, cell by cell, a hand-written patched full forward, and the first pair of
every set is checked against a plain full forward at run time.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from idiom_lens.analyses.memorization import probe_group
from idiom_lens.analyses.saved import Saved, SavedTables, rows_from_merged
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.selection import check_probes
from idiom_lens.errors import InputError
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.runners import PromptRunner, SuffixRunner, masked_prediction
from idiom_lens.models.tokenization import split_masked_probe, split_probe
from idiom_lens.models.vocab import mask_summary, valid_mask

Variant = Literal["word_swap", "prefix_swap"]
PATCH_SITES: tuple[str, ...] = ("resid_pre", "attn_out", "mlp_out")
VARIANTS: tuple[str, ...] = ("word_swap", "prefix_swap")
METHODS: tuple[str, ...] = ("exact", "attribution")
SITE_HOOKS = {"resid_pre": "hook_resid_pre", "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}

# Common English words, for corruptions (short and long, so that a same-length swap usually exists).
WORD_BANK: tuple[str, ...] = (
    "the", "house", "water", "people", "table", "window", "garden", "paper", "river", "music",
    "morning", "city", "school", "money", "family", "friend", "market", "letter", "kitchen",
    "doctor", "car", "road", "book", "chair", "door", "street", "village", "teacher", "night",
    "summer", "winter", "number", "picture", "computer", "office", "company", "problem", "student",
    "water", "green", "small", "large", "quickly", "happy", "young", "old", "simple", "yellow",
    "dog", "cat", "tree", "phone", "bread", "coffee", "sister", "mother", "father", "train",
    "ticket", "bottle", "forest", "island", "mountain", "engine", "pencil", "window", "evening",
    "about", "under", "after", "before", "between", "through", "walk", "write", "open", "carry",
    "listen", "travel", "answer", "remember", "follow", "build", "paint", "clean", "talk", "read",
)


@dataclass(frozen=True, slots=True)
class Corruption:
    """A clean prompt and one corrupted version of it with the same number of tokens."""

    probe_id: str
    variant: str
    clean_prompt: str
    corrupted_prompt: str
    replaced: tuple[int, ...]  # word indices replaced
    clean_ids: tuple[int, ...]
    corrupted_ids: tuple[int, ...]
    target: str
    target_id: int
    kind: str
    suffix_ids: tuple[int, ...] = ()  # a masked LM's closing tokens ([SEP]), after both prompts


@dataclass(frozen=True)
class CorruptionSet:
    """Corruptions that fit, and the probes skipped with the reason."""

    pairs: tuple[Corruption, ...]
    skipped: tuple[tuple[str, str, str], ...]  # (probe_id, variant, reason)

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame([asdict(p) for p in self.pairs], columns=list(Corruption.__dataclass_fields__))

    def skipped_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.skipped, columns=["probe_id", "variant", "reason"])


def _match_case(word: str, like: str) -> str:
    return word.capitalize() if like[:1].isupper() else word


def _swap(words: list[str], index: int, new: str) -> str:
    out = list(words)
    out[index] = _match_case(new, words[index])
    return " ".join(out)


@dataclass(frozen=True, kw_only=True)
class CorruptionOptions:
    """How `make_corruptions` corrupts each prompt: the `variants` (`VARIANTS`), the replacement
    word `bank`, the `seed` of every choice, the words ``prefix_swap`` keeps (`keep_last`), the
    word ``word_swap`` replaces (`word_index`, negative from the end; None: tried in a seeded
    order) and the draws ``prefix_swap`` tries (`attempts`). Raises `InputError` for a bad value."""

    variants: tuple[str, ...] = VARIANTS
    bank: tuple[str, ...] = WORD_BANK
    seed: int = 0
    keep_last: int = 2
    word_index: int | None = None
    attempts: int = 200

    def __post_init__(self) -> None:
        variants = (self.variants,) if isinstance(self.variants, str) else tuple(self.variants)
        bad = [v for v in variants if v not in VARIANTS]
        if not variants or bad:
            raise InputError(f"variants must be among {', '.join(VARIANTS)}, got {list(variants)}")
        object.__setattr__(self, "variants", variants)
        bank = (self.bank,) if isinstance(self.bank, str) else tuple(self.bank)
        if not any(w.strip() for w in bank):
            raise InputError("the word bank is empty")
        object.__setattr__(self, "bank", bank)
        if self.keep_last < 0:
            raise InputError(f"keep_last must be >= 0, got {self.keep_last}")
        if self.attempts < 1:
            raise InputError(f"attempts must be >= 1, got {self.attempts}")


def make_corruptions(
    model: LoadedModel,
    probes: Sequence[Probe],
    options: CorruptionOptions = CorruptionOptions(),
) -> CorruptionSet:
    """Corrupted prompts of the same token length, chosen deterministically from `options.bank`
    (seeded); see `CorruptionOptions`. Probes where nothing fits are skipped and reported.
    """
    variants, seed, keep_last = options.variants, options.seed, options.keep_last
    word_index, attempts = options.word_index, options.attempts
    probes = check_probes(probes)
    bank = list(dict.fromkeys(w.strip() for w in options.bank if w.strip()))
    pairs: list[Corruption] = []
    skipped: list[tuple[str, str, str]] = []
    tok = model.tokenizer
    split = split_masked_probe if model.masked else split_probe
    for probe in probes:
        clean = split(tok, probe.prompt, probe.target)
        words = probe.prompt.split()
        n = len(clean.prompt_ids)

        def fits(prompt: str) -> tuple[int, ...] | None:
            try:
                ids = split(tok, prompt, probe.target).prompt_ids  # noqa: B023 (called within this iteration)
            except InputError:
                return None
            return ids if len(ids) == n and ids != clean.prompt_ids else None  # noqa: B023 (called within this iteration)

        for variant in variants:
            rng = random.Random(f"{seed}|{probe.id}|{variant}")
            found: tuple[str, tuple[int, ...], tuple[int, ...]] | None = None
            if variant == "word_swap":
                if word_index is not None:
                    if not -len(words) <= word_index < len(words):
                        skipped.append((probe.id, variant, f"no word {word_index} in a {len(words)}-word prompt"))
                        continue
                    positions = [word_index % len(words)]
                else:
                    positions = list(range(len(words)))
                    rng.shuffle(positions)
                for i in positions:
                    candidates = [w for w in bank if w.lower() != words[i].lower()]
                    rng.shuffle(candidates)
                    for w in candidates:
                        prompt = _swap(words, i, w)
                        ids = fits(prompt)
                        if ids is not None:
                            found = (prompt, (i,), ids)
                            break
                    if found:
                        break
            else:
                n_replace = len(words) - keep_last
                if n_replace < 1:
                    skipped.append((probe.id, variant, f"prompt has {len(words)} words, needs more than {keep_last}"))
                    continue
                # Prefer replacements with the same stand-alone token count as each original word.
                def count(w: str, first: bool) -> int:
                    return len(tok(w if first else " " + w, add_special_tokens=False)["input_ids"])

                by_count: dict[int, list[str]] = {}
                for w in bank:
                    by_count.setdefault(count(w, False), []).append(w)
                for _ in range(attempts):
                    new = list(words)
                    for i in range(n_replace):
                        c = count(words[i], i == 0)
                        pool = [w for w in by_count.get(c, bank) if w.lower() != words[i].lower()] or bank
                        new[i] = _match_case(rng.choice(pool), words[i])
                    prompt = " ".join(new)
                    ids = fits(prompt)
                    if ids is not None:
                        found = (prompt, tuple(range(n_replace)), ids)
                        break
            if found is None:
                skipped.append((probe.id, variant, f"no bank word keeps the prompt at {n} tokens"))
                continue
            prompt, replaced, ids = found
            pairs.append(Corruption(
                probe.id, variant, probe.prompt, prompt, replaced, tuple(clean.prompt_ids), tuple(ids),
                probe.target, clean.target_id, probe.kind, tuple(clean.suffix_ids),
            ))
    return CorruptionSet(tuple(pairs), tuple(skipped))


# --------------------------------------------------------------------------------------
# Patching one pair
# --------------------------------------------------------------------------------------


def site_activations(
    model: LoadedModel, ids: Sequence[int], sites: Sequence[str], *, suffix_ids: Sequence[int] = ()
) -> tuple[dict, Tensor]:
    """Every site's activation at every layer and position (a masked LM's `suffix_ids` too), and the
    read-position logits."""
    runner = PromptRunner(model, ids, use_kv=False, suffix_ids=suffix_ids)
    acts: dict[tuple[str, int], Tensor] = {}

    def capture(key: tuple[str, int]):
        def hook(x: Tensor, hook: Any) -> None:
            acts[key] = x[0].detach().clone()

        return hook

    hooks = [(f"blocks.{l}.{SITE_HOOKS[s]}", capture((s, l))) for s in sites for l in range(model.n_layers)]
    logits = runner.run(1, hooks)[0]
    return acts, logits


Cell = tuple[str, int, int]  # (site, layer, position)


def patch_layer(
    runner: SuffixRunner, source: dict[tuple[str, int], Tensor], cells: Sequence[Cell]
) -> Float[Tensor, "row d_model"]:
    """One batch of cells of one layer: row r is the runner's prompt resumed at that layer with
    `source`'s activation written at `cells[r]` (``resid_pre`` into the residual entering the
    block, the other sites by a hook on the block's output). Returns what the unembedding reads at
    the read position (`SuffixRunner.run(unembed=False)`)."""
    layers = {l for _, l, _ in cells}
    if len(layers) != 1:
        raise InputError(f"patch_layer takes the cells of one layer, got layers {sorted(layers)}")
    layer = layers.pop()
    x = runner.resid[layer].expand(len(cells), -1, -1).clone()
    hooks = []
    for site in sorted({s for s, _, _ in cells}):
        rows_t = torch.tensor([r for r, (s, _, _) in enumerate(cells) if s == site])
        pos_t = torch.tensor([p for s, _, p in cells if s == site])
        value = source[(site, layer)][pos_t].to(x.dtype)
        if site == "resid_pre":  # the residual entering block `layer` is what the run resumes from
            x[rows_t, pos_t] = value
            continue

        def hook(h: Tensor, hook: Any, rows_t: Tensor = rows_t, pos_t: Tensor = pos_t, value: Tensor = value) -> Tensor:
            h = h.clone()
            h[rows_t, pos_t] = value.to(h.dtype)
            return h

        hooks.append((f"blocks.{layer}.{SITE_HOOKS[site]}", hook))
    return runner.run(len(cells), hooks, start=layer, resid=x, unembed=False)


@dataclass(frozen=True)
class PairPatching:
    """Patched target logits of one clean/corrupted pair: [site, layer, pos]."""

    sites: tuple[str, ...]
    patched: Float[Tensor, "site layer pos"]
    clean_logit: float
    corrupted_logit: float
    clean_pred_id: int
    corrupted_pred_id: int

    @property
    def restored(self) -> Float[Tensor, "site layer pos"]:
        return (self.patched - self.corrupted_logit) / (self.clean_logit - self.corrupted_logit)


def _check_pair(clean_ids: Sequence[int], corrupted_ids: Sequence[int], sites: Sequence[str]) -> None:
    """`InputError` unless the prompts have one token length and `sites` are patch sites."""
    if len(clean_ids) != len(corrupted_ids):
        raise InputError(
            "clean and corrupted prompts must have the same token length, "
            f"got {len(clean_ids)} and {len(corrupted_ids)}"
        )
    bad = [s for s in sites if s not in PATCH_SITES]
    if not sites or bad:
        raise InputError(f"sites must be among {', '.join(PATCH_SITES)}, got {list(sites)}")


def patch_pair(
    model: LoadedModel,
    *,
    clean_ids: Sequence[int],
    corrupted_ids: Sequence[int],
    target_id: int,
    sites: Sequence[str] = PATCH_SITES,
    sender: Literal["clean", "corrupted"] = "clean",
    receiver: Literal["clean", "corrupted"] = "corrupted",
    batch_size: int = 64,
    suffix_ids: Sequence[int] = (),
) -> PairPatching:
    """Patch `sender`'s activation into `receiver`'s run at every (site, layer, position).

    The default (clean into corrupted) measures restoration; sender == receiver is a no-op
    used as an invariant (restores 1.0 into clean, 0.0 into corrupted). A masked LM's prompts end
    with the mask, both followed by `suffix_ids` ([SEP], never patched).
    """
    _check_pair(clean_ids, corrupted_ids, sites)
    clean_acts, clean_logits = site_activations(model, clean_ids, sites, suffix_ids=suffix_ids)
    corr_acts, corr_logits = site_activations(model, corrupted_ids, sites, suffix_ids=suffix_ids)
    source = clean_acts if sender == "clean" else corr_acts
    runner = SuffixRunner(model, clean_ids if receiver == "clean" else corrupted_ids, suffix_ids=suffix_ids)
    n_layers, n_pos = model.n_layers, len(clean_ids)
    reads = []
    for layer in range(n_layers):
        cells = [(s, layer, p) for s in sites for p in range(n_pos)]
        reads += [patch_layer(runner, source, cells[i : i + batch_size]) for i in range(0, len(cells), batch_size)]
    patched = runner.token_logits(torch.cat(reads), target_id)  # (layer, site, pos) order
    patched = patched.reshape(n_layers, len(sites), n_pos).transpose(0, 1)
    return PairPatching(
        tuple(sites), patched, float(clean_logits[target_id]), float(corr_logits[target_id]),
        masked_prediction(clean_logits, valid_mask(model))[0], masked_prediction(corr_logits, valid_mask(model))[0],
    )


# --------------------------------------------------------------------------------------
# Patching a probe set
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PatchingResult(Saved):
    """Restored share of the target logit per pair, site, layer and position (tidy).

    Saved (`save`/`load`) as `patching.parquet` (`to_dataframe()`: the rows with each pair's group
    and validity; `load` takes the rows' own columns back out), `patching_pairs.parquet`,
    `patching_skipped.parquet` and the descriptor: the files `write` writes, plus the descriptor.
    """

    rows: pd.DataFrame  # probe_id, variant, site, layer, pos, pos_from_end, token, patched_logit, restored
    pairs: pd.DataFrame  # one row per pair: prompts, clean/corrupted logits, group, valid
    skipped: pd.DataFrame  # probe_id, variant, reason
    settings: dict[str, Any]

    def to_dataframe(self) -> pd.DataFrame:
        return self.rows.merge(self.pairs[["probe_id", "variant", "group", "valid"]], on=["probe_id", "variant"])

    def mean_heatmap(self, *, site: str, variant: str, group: str | None = None) -> pd.DataFrame:
        """Mean restored share, layer x position counted from the end (-1 = last), valid pairs only."""
        frame = self.to_dataframe()
        frame = frame[(frame["site"] == site) & (frame["variant"] == variant) & frame["valid"]]
        if group is not None:
            frame = frame[frame["group"] == group]
        return frame.pivot_table(index="layer", columns="pos_from_end", values="restored", aggfunc="mean")

    default_name = "patching"

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        merged = self.to_dataframe()
        if len(merged) != len(self.rows) or {"group", "valid"} & set(self.rows.columns):
            raise ValueError("patching rows must have exactly one pair each and no group/valid columns of their own")
        return {"": merged, "pairs": self.pairs, "skipped": self.skipped}

    def saved_meta(self) -> dict[str, Any]:
        return {"row_columns": [str(c) for c in self.rows.columns]}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> PatchingResult:
        rows = rows_from_merged(saved.tables[""], saved.meta["row_columns"])
        return cls(rows=rows, pairs=saved.tables["pairs"], skipped=saved.tables["skipped"], settings=saved.settings)


ROW_COLUMNS = ["probe_id", "variant", "site", "layer", "pos", "pos_from_end", "patched_logit", "restored",
               "clean_token", "corrupted_token"]
PAIR_COLUMNS = ["probe_id", "variant", "kind", "group", "memorized", "clean_prompt", "corrupted_prompt", "target",
                "target_id", "clean_logit", "corrupted_logit", "gap", "valid", "clean_pred_token",
                "corrupted_pred_token", "n_tokens"]


def pair_tables(
    model: LoadedModel, pair: Corruption, result: PairPatching, *, min_gap: float
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One pair's rows (site x layer x position) and its pair row; exact and attribution patching
    both tabulate through here. Pairs whose clean and corrupted target logits differ by less than
    `min_gap` get NaN restored shares (`valid` False)."""
    decode = model.tokenizer.decode
    gap = result.clean_logit - result.corrupted_logit
    valid = abs(gap) >= min_gap
    restored = result.restored if valid else torch.full_like(result.patched, float("nan"))
    n_sites, n_layers, n_pos = result.patched.shape
    s_idx, l_idx, p_idx = (a.ravel() for a in np.indices((n_sites, n_layers, n_pos)))
    frame = pd.DataFrame({
        "probe_id": pair.probe_id, "variant": pair.variant, "site": np.asarray(result.sites)[s_idx],
        "layer": l_idx, "pos": p_idx, "pos_from_end": p_idx - n_pos,
        "patched_logit": result.patched.flatten().numpy().astype(np.float64),
        "restored": restored.flatten().numpy().astype(np.float64),
        "clean_token": [decode([pair.clean_ids[p]]) for p in p_idx],
        "corrupted_token": [decode([pair.corrupted_ids[p]]) for p in p_idx],
    }, columns=ROW_COLUMNS)
    memorized = result.clean_pred_id == pair.target_id
    row = {
        "probe_id": pair.probe_id, "variant": pair.variant, "kind": pair.kind,
        "group": probe_group(pair.kind, memorized), "memorized": memorized,
        "clean_prompt": pair.clean_prompt, "corrupted_prompt": pair.corrupted_prompt,
        "target": pair.target, "target_id": pair.target_id,
        "clean_logit": result.clean_logit, "corrupted_logit": result.corrupted_logit, "gap": gap,
        "valid": valid, "clean_pred_token": decode([result.clean_pred_id]),
        "corrupted_pred_token": decode([result.corrupted_pred_id]), "n_tokens": len(pair.clean_ids),
    }
    return frame, row


@dataclass(frozen=True, kw_only=True)
class PatchingOptions:
    """What a patching run does: how prompts are corrupted (`corruption`), the patched `sites`
    (`PATCH_SITES`), the smallest clean-minus-corrupted target logit gap worth restoring
    (`min_gap`; below it the restored shares are NaN) and the `method`, exact or attribution
    (read by `patch`). Raises `InputError` for a bad value."""

    corruption: CorruptionOptions = CorruptionOptions()
    sites: tuple[str, ...] = PATCH_SITES
    min_gap: float = 0.5
    method: str = "exact"

    def __post_init__(self) -> None:
        if not isinstance(self.corruption, CorruptionOptions):
            raise InputError(f"corruption must be a CorruptionOptions, got {self.corruption!r}")
        sites = (self.sites,) if isinstance(self.sites, str) else tuple(self.sites)
        bad = [s for s in sites if s not in PATCH_SITES]
        if not sites or bad:
            raise InputError(f"sites must be among {', '.join(PATCH_SITES)}, got {list(sites)}")
        object.__setattr__(self, "sites", sites)
        if self.min_gap < 0:
            raise InputError(f"min_gap must be >= 0, got {self.min_gap}")
        if self.method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")


# A pair's patching: (model, pair, first) -> its `PairPatching`; `first` is True for the set's first
# pair, the one checked against a plain full forward.
PairKernel = Callable[[LoadedModel, Corruption, bool], PairPatching]


def _patch_set(
    model: LoadedModel,
    probes: Sequence[Probe],
    options: PatchingOptions,
    kernel: PairKernel,
    *,
    method: str,
    notes: dict[str, Any],
    progress: bool,
) -> PatchingResult:
    """Corrupt `probes`, run `kernel` on every pair and tabulate: exact and attribution patching
    differ only in their kernel (and the `notes` their settings add)."""
    if not isinstance(options, PatchingOptions):
        raise InputError(f"options must be a PatchingOptions, got {type(options).__name__}")
    corruption = options.corruption
    corruptions = make_corruptions(model, probes, corruption)
    started = time.perf_counter()
    frames, pair_rows = [], []
    desc = "patching" if method == "exact" else f"{method} patching"
    for i, pair in enumerate(tqdm(corruptions.pairs, desc=desc, unit="pair", disable=not progress)):
        frame, row = pair_tables(model, pair, kernel(model, pair, i == 0), min_gap=options.min_gap)
        frames.append(frame)
        pair_rows.append(row)
    rows = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=ROW_COLUMNS)
    settings = model.settings() | mask_summary(model) | {
        "analysis": "activation_patching", "method": method,
        "metric": "target logit, (patched - corrupted) / (clean - corrupted)", **notes,
        "variants": list(corruption.variants), "sites": list(options.sites), "seed": corruption.seed,
        "keep_last": corruption.keep_last, "min_gap": options.min_gap, "n_pairs": len(corruptions.pairs),
        "n_skipped": len(corruptions.skipped), "seconds": round(time.perf_counter() - started, 2),
    }
    return PatchingResult(rows, pd.DataFrame(pair_rows, columns=PAIR_COLUMNS), corruptions.skipped_frame(), settings)


def patch_probes(
    model: LoadedModel,
    probes: Sequence[Probe],
    options: PatchingOptions = PatchingOptions(),
    *,
    batch_size: int = 64,
    progress: bool = False,
) -> PatchingResult:
    """Patch clean into corrupted for every probe and variant (exact: one patched run per site,
    layer and position, `batch_size` of them per forward); restored share of the target logit.
    `options.method` is not read here (`patch` dispatches on it).

    Raises `FastPathError` when its fast path disagrees with a full forward (first pair, before
    any is patched).
    """
    def exact(model: LoadedModel, pair: Corruption, first: bool) -> PairPatching:
        if first:  # the shortcuts under the installed versions, against a plain full forward
            SuffixRunner(model, pair.corrupted_ids, suffix_ids=pair.suffix_ids).self_check(
                what="patching", probe=pair.probe_id, token_id=pair.target_id)
        return patch_pair(model, clean_ids=pair.clean_ids, corrupted_ids=pair.corrupted_ids,
                          target_id=pair.target_id, sites=options.sites, batch_size=batch_size,
                          suffix_ids=pair.suffix_ids)

    return _patch_set(model, probes, options, exact, method="exact", notes={}, progress=progress)

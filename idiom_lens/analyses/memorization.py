"""Which probes a model has memorized (method.md section 2).

A probe is memorized when the model's greedy next token after the prompt equals the target
token (the first sub-word of the last word). No threshold. We also keep the target's rank and
probability, and whether every sub-word of the target is the greedy choice given the previous
ones (teacher-forced `full_target_match`).

Facts need two controls before memorized and non-memorized ones are compared (`relation_baselines`):
- a majority baseline per relation: the share of a relation's facts whose target is the
  relation's most common target, i.e. the accuracy of always giving that answer ("English" for
  every "The official language of X is"), beside the model's memorization rate;
- content-word predictions: a model that does not recall a fact mostly predicts a function word
  (" the", " a"), so non-memorized facts differ from memorized ones in the kind of word predicted,
  not only in recall. `pred_is_function_word` (a column of `to_dataframe`) marks those
  predictions, `content_predictions()` keeps the others, and the rates are also given within
  content-word predictions.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from idiom_lens.analyses.saved import Saved, SavedTables, records_from_frame
from idiom_lens.analyses.stats import wilson_interval
from idiom_lens.datasets.flags import STOP_WORDS, bare
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.relations import FACT_RELATIONS, UNKNOWN_RELATION, fact_relation
from idiom_lens.errors import InputError
from idiom_lens.groups import GROUPS  # noqa: F401  (re-exported: the sets, defined in idiom_lens.groups)
from idiom_lens.models.forward import ForwardBatch, greedy_at_last, iterate_forward, tokenize_probes
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.tokenization import ProbeTokens

# Function words: the closed-class English words of the flag rules (`datasets.flags.STOP_WORDS`,
# written out there: determiners, pronouns, prepositions, particles, conjunctions, auxiliaries and
# a few generic adverbs such as "now", "back"). The same list decides which idiom and text targets
# are not content words, so "content word" means one thing across the project.
FUNCTION_WORDS = STOP_WORDS


def is_function_token(token: str) -> bool:
    """True when a decoded token is not an alphabetic content word.

    That is: a function word (`FUNCTION_WORDS`, compared lower-cased without surrounding spaces
    and punctuation: " The", " of", " it's"), a single letter (the clitic "'s", an initial), or a
    token that is not a letters-only word: punctuation, digits, whitespace, special tokens (",",
    " 1990", a newline, "<eos>"; inner hyphens and apostrophes count as letters). A sub-word
    of a content word (" Kab" of "Kabul") is content. Why: a model that does not know a fact tends
    to continue the sentence with such a token, not with a wrong content answer.
    """
    word = bare(token.strip())
    return len(word) < 2 or word in FUNCTION_WORDS or not word.replace("'", "").replace("-", "").isalpha()


def probe_group(kind: str, memorized: bool) -> str:
    """The comparison set of a probe: ordinary text is one set whatever the model predicts."""
    if kind == "text":
        return "ordinary text"
    plural = {"idiom": "idioms", "fact": "facts"}.get(kind, f"{kind}s")
    return f"{'memorized' if memorized else 'non-memorized'} {plural}"


@dataclass(frozen=True, slots=True)
class MemorizationRecord:
    """One probe scored on one model."""

    probe_id: str
    kind: str
    group: str
    hard_to_guess: bool | None
    prompt: str
    target: str
    target_id: int
    target_token: str
    n_target_tokens: int
    pred_id: int
    pred_token: str
    memorized: bool
    pred_prob: float
    target_rank: int
    target_prob: float
    full_target_match: bool
    # Last, with a default: results saved before this field existed still load.
    single_target: bool | None = None

    @property
    def pred_is_function_word(self) -> bool:
        """The greedy prediction is a function word or not alphabetic (`is_function_token`)."""
        return is_function_token(self.pred_token)


@dataclass(frozen=True)
class MemorizationResult(Saved):
    """Memorization of a probe set on one model, with the settings used.

    Saved (`save`/`load`) as `memorization.parquet` (one row per record) and its descriptor.
    """

    records: tuple[MemorizationRecord, ...]
    settings: dict[str, Any]

    default_name = "memorization"

    def __len__(self) -> int:
        return len(self.records)

    def to_dataframe(self) -> pd.DataFrame:
        """One row per record: its fields, then `pred_is_function_word` (derived from `pred_token`;
        a saved table's extra column is ignored when it is read back)."""
        frame = pd.DataFrame(
            [asdict(r) for r in self.records], columns=list(MemorizationRecord.__dataclass_fields__)
        )
        frame["pred_is_function_word"] = [r.pred_is_function_word for r in self.records]
        return frame

    def content_predictions(self) -> pd.DataFrame:
        """`to_dataframe()` rows whose greedy prediction is a content word (not `pred_is_function_word`),
        to compare memorized and non-memorized probes within content-word predictions."""
        frame = self.to_dataframe()
        return frame[~frame["pred_is_function_word"]].reset_index(drop=True)

    def function_word_shares(self) -> pd.DataFrame:
        """Per comparison set (kind, group): n, n_function_word (predictions that are function words
        or not alphabetic) and their share with its Wilson 95% interval (share_low, share_high)."""
        frame = self.to_dataframe()
        rows = []
        for (kind, group), part in frame.groupby(["kind", "group"], sort=True):
            n, k = len(part), int(part["pred_is_function_word"].sum())
            low, high = wilson_interval(k, n)
            rows.append({"kind": kind, "group": group, "n": n, "n_function_word": k,
                         "share": k / n, "share_low": float(low), "share_high": float(high)})
        return pd.DataFrame(rows, columns=["kind", "group", "n", "n_function_word", "share", "share_low",
                                           "share_high"])

    @classmethod
    def from_dataframe(cls, frame: pd.DataFrame, settings: dict[str, Any]) -> MemorizationResult:
        """Rebuild from `to_dataframe()` output (a table without `single_target` gives None)."""
        return cls(records=records_from_frame(MemorizationRecord, frame), settings=settings)

    def saved_tables(self) -> dict[str, pd.DataFrame]:
        return {"": self.to_dataframe()}

    @classmethod
    def from_saved(cls, saved: SavedTables) -> MemorizationResult:
        return cls.from_dataframe(saved.tables[""], saved.settings)

    def summary(self) -> pd.DataFrame:
        """Counts and fractions memorized per kind, for all probes and the hard_to_guess subset.

        `n_not_single_target` counts the probes of the row whose prompt has another target in
        the set (`Probe.single_target` False; None is not counted). They stay in "all" and are
        never in "hard_to_guess" (the loader sets their hard_to_guess False).
        """
        frame = self.to_dataframe()
        rows = []
        for kind, sub in frame.groupby("kind", sort=True):
            for subset, part in (("all", sub), ("hard_to_guess", sub[sub["hard_to_guess"] == True])):  # noqa: E712
                n = len(part)
                k = int(part["memorized"].sum())
                rows.append(
                    {
                        "kind": kind,
                        "subset": subset,
                        "n": n,
                        "memorized": k,
                        "fraction": k / n if n else float("nan"),
                        "full_target_match": int(part["full_target_match"].sum()),
                        "n_not_single_target": int((part["single_target"] == False).sum()),  # noqa: E712
                    }
                )
        return pd.DataFrame(rows)

    def by_relation(self, probes: Iterable[Probe]) -> pd.DataFrame:
        """Memorized counts and fractions per fact relation, for all probes and the hard_to_guess ones.

        The records must come from scoring `probes` (they are matched by probe id); non-fact probes
        are ignored. Columns: relation, n, memorized, fraction, n_hard_to_guess,
        memorized_hard_to_guess, fraction_hard_to_guess, then the Wilson 95% intervals fraction_low,
        fraction_high, fraction_hard_to_guess_low, fraction_hard_to_guess_high; one row per
        relation present (known ones in `FACT_RELATIONS` order, then "unknown"), and a final row "all".
        """
        frame, order = self._facts_by_relation(probes)
        rows = [_relation_row(name, frame[frame["relation"] == name]) for name in order]
        rows.append(_relation_row("all", frame))
        return pd.DataFrame(rows)

    def relation_baselines(self, probes: Iterable[Probe]) -> pd.DataFrame:
        """Per fact relation: the majority-answer baseline beside the model's memorization rate,
        for all predictions and within content-word predictions.

        Records are matched to `probes` by id as in `by_relation`. Columns:
        - relation, n; majority_target (the most common target; ties: the first in sorted order),
          majority_count, majority_share = majority_count / n: the accuracy of always answering
          the majority target, with its Wilson 95% interval (majority_share_low/_high);
        - memorized, fraction (the memorization rate) and fraction_low/_high;
        - n_function_word: facts whose prediction is a function word or not alphabetic
          (`is_function_token`); n_content, memorized_content, fraction_content: the same rate
          among the other facts (content-word predictions), with fraction_content_low/_high.
        Rows as in `by_relation`; in the final "all" row majority_target is missing (None) and
        majority_count sums each relation's majority count (the accuracy of answering every
        relation's majority target).
        """
        frame, order = self._facts_by_relation(probes)
        rows = [_baseline_row(name, frame[frame["relation"] == name]) for name in order]
        total = _baseline_row("all", frame)
        total["majority_target"] = None
        total["majority_count"] = sum(row["majority_count"] for row in rows)
        total.update(_share("majority_share", total["majority_count"], total["n"]))
        rows.append(total)
        return pd.DataFrame(rows)

    def _facts_by_relation(self, probes: Iterable[Probe]) -> tuple[pd.DataFrame, list[str]]:
        """The fact rows of `to_dataframe()` with a `relation` column, and the relations present in
        report order; `InputError` when a fact record's probe is not in `probes` (the other kinds
        are ignored: `probes` may be the facts alone)."""
        by_id = {p.id: p for p in probes}
        frame = self.to_dataframe()
        frame = frame[frame["kind"] == "fact"].copy()
        unknown_ids = sorted(set(frame["probe_id"]) - set(by_id))
        if unknown_ids:
            raise InputError(f"{len(unknown_ids)} scored fact(s) are not in the probe list, e.g. {unknown_ids[:3]}")
        frame["relation"] = [fact_relation(by_id[i]) for i in frame["probe_id"]]
        order = [r for r in (*FACT_RELATIONS, UNKNOWN_RELATION) if r in set(frame["relation"])]
        return frame, order


def _share(name: str, k: int, n: int) -> dict[str, float]:
    """`name`, `name_low`, `name_high`: the share k / n with its Wilson 95% interval (NaN when n is 0)."""
    low, high = wilson_interval(k, n)
    return {name: k / n if n else float("nan"), f"{name}_low": float(low), f"{name}_high": float(high)}


def _relation_row(name: str, part: pd.DataFrame) -> dict:
    """One row of `MemorizationResult.by_relation`."""
    hard = part[part["hard_to_guess"] == True]  # noqa: E712 (None is not hard_to_guess)
    n, k = len(part), int(part["memorized"].sum())
    n_hard, k_hard = len(hard), int(hard["memorized"].sum())
    everything = _share("fraction", k, n)
    hard_share = _share("fraction_hard_to_guess", k_hard, n_hard)
    return {
        "relation": name,
        "n": n,
        "memorized": k,
        "fraction": everything.pop("fraction"),
        "n_hard_to_guess": n_hard,
        "memorized_hard_to_guess": k_hard,
        "fraction_hard_to_guess": hard_share.pop("fraction_hard_to_guess"),
        **everything,
        **hard_share,
    }


def _baseline_row(name: str, part: pd.DataFrame) -> dict:
    """One row of `MemorizationResult.relation_baselines`."""
    n = len(part)
    counts = part["target"].value_counts()
    majority_count = int(counts.max()) if n else 0
    majority_target = min(t for t, c in counts.items() if c == majority_count) if n else None
    content = part[~part["pred_is_function_word"]]
    k, k_content = int(part["memorized"].sum()), int(content["memorized"].sum())
    return {
        "relation": name,
        "n": n,
        "majority_target": majority_target,
        "majority_count": majority_count,
        **_share("majority_share", majority_count, n),
        "memorized": k,
        **_share("fraction", k, n),
        "n_function_word": n - len(content),
        "n_content": len(content),
        "memorized_content": k_content,
        **_share("fraction_content", k_content, len(content)),
    }


def records_from_batch(
    model: LoadedModel,
    probes: Sequence[Probe],
    probe_tokens: Sequence[ProbeTokens],
    batch: ForwardBatch,
) -> list[MemorizationRecord]:
    """Score the probes of one forward batch (shared with the trajectory, which runs the same pass)."""
    rows = torch.arange(len(batch.indices), device=batch.logits.device)
    final = batch.logits[rows, batch.last].float()
    log_probs = final.log_softmax(dim=-1)
    pred = greedy_at_last(batch)
    decode = model.tokenizer.decode
    out = []
    for row, index in enumerate(batch.indices):
        probe, toks = probes[index], probe_tokens[index]
        target_id = toks.target_id
        target_logit = final[row, target_id]
        last = int(batch.last[row])
        n_target = len(toks.target_ids)
        # teacher-forced: every sub-word of the target is the greedy choice after the previous ones
        greedy = batch.logits[row, last : last + n_target].argmax(dim=-1)
        full = greedy.tolist() == list(toks.target_ids)
        pred_id = int(pred[row])
        out.append(
            MemorizationRecord(
                probe_id=probe.id,
                kind=probe.kind,
                group=probe_group(probe.kind, pred_id == target_id),
                hard_to_guess=probe.hard_to_guess,
                prompt=probe.prompt,
                target=probe.target,
                target_id=target_id,
                target_token=decode([target_id]),
                n_target_tokens=n_target,
                pred_id=pred_id,
                pred_token=decode([pred_id]),
                memorized=pred_id == target_id,
                pred_prob=float(log_probs[row, pred_id].exp()),
                target_rank=int((final[row] > target_logit).sum()),
                target_prob=float(log_probs[row, target_id].exp()),
                full_target_match=bool(full),
                single_target=probe.single_target,
            )
        )
    return out


def score_memorization(
    model: LoadedModel,
    probes: Sequence[Probe],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> MemorizationResult:
    """Greedy prediction vs target for every probe, batched (one forward pass per batch)."""
    probes = list(probes)
    probe_tokens = tokenize_probes(model, probes)
    records: list[MemorizationRecord | None] = [None] * len(probes)
    for batch in iterate_forward(
        model, probe_tokens, batch_size=batch_size, progress=progress, desc="memorization"
    ):
        for index, record in zip(batch.indices, records_from_batch(model, probes, probe_tokens, batch)):
            records[index] = record
    return MemorizationResult(records=tuple(r for r in records if r is not None), settings=model.settings())

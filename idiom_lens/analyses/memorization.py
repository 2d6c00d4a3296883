"""Which probes a model has memorized (method.md section 2).

A probe is memorized when the model's greedy next token after the prompt equals the target
token (the first sub-word of the last word). No threshold. We also keep the target's rank and
probability, and whether every sub-word of the target is the greedy choice given the previous
ones (teacher-forced `full_target_match`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pandas as pd
import torch

from idiom_lens.analyses.saved import Saved, SavedTables, records_from_frame
from idiom_lens.datasets.probes import Probe
from idiom_lens.datasets.relations import FACT_RELATIONS, UNKNOWN_RELATION, fact_relation
from idiom_lens.errors import InputError
from idiom_lens.groups import GROUPS  # noqa: F401  (re-exported: the sets, defined in idiom_lens.groups)
from idiom_lens.models.forward import ForwardBatch, iterate_forward, tokenize_probes
from idiom_lens.models.loading import LoadedModel
from idiom_lens.models.tokenization import ProbeTokens


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
        return pd.DataFrame(
            [asdict(r) for r in self.records], columns=list(MemorizationRecord.__dataclass_fields__)
        )

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
        memorized_hard_to_guess, fraction_hard_to_guess; one row per relation present (known ones in
        `FACT_RELATIONS` order, then "unknown"), and a final row "all".
        """
        by_id = {p.id: p for p in probes}
        frame = self.to_dataframe()
        unknown_ids = sorted(set(frame["probe_id"]) - set(by_id))
        if unknown_ids:
            raise InputError(f"{len(unknown_ids)} scored probe(s) are not in the probe list, e.g. {unknown_ids[:3]}")
        frame = frame[frame["kind"] == "fact"].copy()
        frame["relation"] = [fact_relation(by_id[i]) for i in frame["probe_id"]]
        order = [r for r in (*FACT_RELATIONS, UNKNOWN_RELATION) if r in set(frame["relation"])]
        rows = [_relation_row(name, frame[frame["relation"] == name]) for name in order]
        rows.append(_relation_row("all", frame))
        return pd.DataFrame(rows)


def _relation_row(name: str, part: pd.DataFrame) -> dict:
    """One row of `MemorizationResult.by_relation`."""
    hard = part[part["hard_to_guess"] == True]  # noqa: E712 (None is not hard_to_guess)
    n, k = len(part), int(part["memorized"].sum())
    n_hard, k_hard = len(hard), int(hard["memorized"].sum())
    return {
        "relation": name,
        "n": n,
        "memorized": k,
        "fraction": k / n if n else float("nan"),
        "n_hard_to_guess": n_hard,
        "memorized_hard_to_guess": k_hard,
        "fraction_hard_to_guess": k_hard / n_hard if n_hard else float("nan"),
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
    pred = final.argmax(dim=-1)
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

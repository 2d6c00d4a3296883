"""Fact relations: which relation a fact probe tests, and memorization per relation.

Bundled fact probes carry their relation twice: the id is `fact-{relation}-{subject}` and
`source` starts with the relation name ("capital countryinfo==1.0.1"). A user's own fact file
can do the same (either is enough).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Iterable

import pandas as pd

from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError

if TYPE_CHECKING:
    from idiom_lens.analyses.memorization import MemorizationResult

# The bundled relations, with an example (the builder's templates are in `fact_sources`).
FACT_RELATIONS: dict[str, str] = {
    "capital": "The capital of France is -> Paris",
    "capital_of": "Paris is the capital of -> France",
    "currency_of": "The baht is the currency of -> Thailand",
    "language": "The official language of Brazil is -> Portuguese",
    "state_capital": "The capital of the state of Texas is -> Austin",
    "element": "The chemical element with the symbol Fe is -> iron",
    "city_country": "Osaka is a city in the country of -> Japan",
}
UNKNOWN_RELATION = "unknown"
_ID = re.compile(r"fact-([a-z_]+)-")


def fact_relation(probe: Probe) -> str:
    """The relation a fact probe tests: the first word of `source`, else the `fact-{relation}-` id
    prefix, when either names a known relation; else "unknown"."""
    head = probe.source.split(maxsplit=1)[0] if probe.source.strip() else ""
    if head in FACT_RELATIONS:
        return head
    match = _ID.match(probe.id)
    if match and match.group(1) in FACT_RELATIONS:
        return match.group(1)
    return UNKNOWN_RELATION


def memorization_by_relation(result: MemorizationResult, probes: Iterable[Probe]) -> pd.DataFrame:
    """Memorized counts and fractions per fact relation, for all probes and the hard_to_guess ones.

    `result` must come from scoring `probes` (records are matched by probe id); non-fact probes
    are ignored. Columns: relation, n, memorized, fraction, n_hard_to_guess,
    memorized_hard_to_guess, fraction_hard_to_guess; one row per relation present (known ones in
    `FACT_RELATIONS` order, then "unknown"), and a final row "all".
    """
    by_id = {p.id: p for p in probes}
    frame = result.to_dataframe()
    unknown_ids = sorted(set(frame["probe_id"]) - set(by_id))
    if unknown_ids:
        raise InputError(f"{len(unknown_ids)} scored probe(s) are not in the probe list, e.g. {unknown_ids[:3]}")
    frame = frame[frame["kind"] == "fact"].copy()
    frame["relation"] = [fact_relation(by_id[i]) for i in frame["probe_id"]]
    order = [r for r in (*FACT_RELATIONS, UNKNOWN_RELATION) if r in set(frame["relation"])]
    rows = [_row(name, frame[frame["relation"] == name]) for name in order]
    rows.append(_row("all", frame))
    return pd.DataFrame(rows)


def _row(name: str, part: pd.DataFrame) -> dict:
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

"""Fact relations: which relation a fact probe tests.

Bundled fact probes carry their relation twice: the id is `fact-{relation}-{subject}` and
`source` starts with the relation name ("capital countryinfo==1.0.1"). A user's own fact file
can do the same (either is enough). Memorization per relation is an analysis:
`MemorizationResult.by_relation` (`idiom_lens.analyses.memorization`).
"""

from __future__ import annotations

import re

from idiom_lens.datasets.probes import Probe

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

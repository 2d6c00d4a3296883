"""The probe record: one word sequence whose last word is the target of recall.

Every data source (bundled sets, the authors' IdioMem file, user files) becomes `Probe`s;
every analysis takes a `ProbeSet`. Flags follow ../shared/method.md section 1 and are `None`
where a source does not carry them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal, Sequence

import pandas as pd

ProbeKind = Literal["idiom", "fact", "text"]
PROBE_KINDS: tuple[ProbeKind, ...] = ("idiom", "fact", "text")


@dataclass(frozen=True, slots=True)
class Probe:
    """A word sequence split into prompt (all words but the last) and target (the last word)."""

    id: str
    prompt: str
    target: str
    kind: ProbeKind
    source: str = ""
    similarity_ind: bool | None = None
    prompt_comp_ind: bool | None = None
    frequent_target_ind: bool | None = None
    hard_to_guess: bool | None = None

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.target}"


@dataclass(frozen=True)
class ProbeSet:
    """A named, ordered collection of probes with unique ids."""

    name: str
    probes: tuple[Probe, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.probes)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self.probes)

    def __getitem__(self, i: int) -> Probe:
        return self.probes[i]

    def to_dataframe(self) -> pd.DataFrame:
        rows = [asdict(p) | {"text": p.text} for p in self.probes]
        return pd.DataFrame(rows, columns=[*Probe.__dataclass_fields__, "text"])

    @staticmethod
    def concat(name: str, sets: Sequence["ProbeSet"]) -> "ProbeSet":
        return ProbeSet(name, tuple(p for s in sets for p in s.probes))

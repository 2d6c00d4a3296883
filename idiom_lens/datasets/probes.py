"""The probe record: one word sequence whose last word is the target of recall.

Every data source (bundled sets, the authors' IdioMem file, user files) becomes `Probe`s;
every analysis takes a `ProbeSet`. Flags follow ../shared/method.md section 1 and are `None`
where a source does not carry them. `single_target` (criterion 1) is not one of the authors' four
flags: it depends on the whole set, so the loader computes it (see `Probe`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import pandas as pd

ProbeKind = Literal["idiom", "fact", "text"]
PROBE_KINDS: tuple[ProbeKind, ...] = ("idiom", "fact", "text")
FLAG_NAMES: tuple[str, ...] = ("similarity_ind", "prompt_comp_ind", "frequent_target_ind", "hard_to_guess")


@dataclass(frozen=True, slots=True)
class Probe:
    """A word sequence split into prompt (all words but the last) and target (the last word).

    `single_target` (method.md criterion 1) is False when another probe of the same set has the
    same prompt (case and spacing aside) but a different target ("dead as a doornail" / "dead as
    a dodo"): the prompt then has more than one correct continuation. The loader computes it for
    every set it loads and sets `hard_to_guess` False for such probes, whatever the file says;
    it is None only for probes built by hand, outside a loaded set.
    """

    id: str
    prompt: str
    target: str
    kind: ProbeKind
    source: str = ""
    similarity_ind: bool | None = None
    prompt_comp_ind: bool | None = None
    frequent_target_ind: bool | None = None
    hard_to_guess: bool | None = None
    single_target: bool | None = None

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.target}"


@dataclass(frozen=True)
class ProbeSet:
    """A named, ordered collection of probes with unique ids.

    `skipped` lists the rows a loader left out when asked to (`on_error="skip"`), one
    "file:line: reason" each, so that nothing is dropped without a trace.
    """

    name: str
    probes: tuple[Probe, ...] = field(default_factory=tuple)
    skipped: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.probes)

    def __iter__(self) -> Iterator[Probe]:
        return iter(self.probes)

    def __getitem__(self, i: int) -> Probe:
        return self.probes[i]

    def to_dataframe(self) -> pd.DataFrame:
        rows = [asdict(p) | {"text": p.text} for p in self.probes]
        return pd.DataFrame(rows, columns=[*Probe.__dataclass_fields__, "text"])

    def flag_counts(self) -> dict[str, int]:
        """Number of probes whose flag is True, per flag (None counts as not True), and
        `not_single_target`: the number whose `single_target` is False (None is not counted)."""
        counts = {name: sum(getattr(p, name) is True for p in self.probes) for name in FLAG_NAMES}
        counts["not_single_target"] = sum(p.single_target is False for p in self.probes)
        return counts

    @staticmethod
    def concat(name: str, sets: Sequence[ProbeSet]) -> ProbeSet:
        return ProbeSet(name, tuple(p for s in sets for p in s.probes), tuple(x for s in sets for x in s.skipped))

"""Choosing the probes a run works on: joined sets with unique ids, the first N of each, seeded
samples, and the check every intervention makes of its probe list.

One module, so that the CLI (`idiom_lens.cli.common.select_probes`), the study and the
interventions select and check probes the same way.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from idiom_lens.datasets.loaders import load_probes
from idiom_lens.datasets.probes import Probe, ProbeSet
from idiom_lens.errors import InputError


def sample_probes(probes: Sequence[Probe], n: int | None, *, seed: int = 0) -> list[Probe]:
    """A seeded sample of `n` probes in their original order (all of them when n is None)."""
    probes = list(probes)
    if n is None or n >= len(probes):
        return probes
    if n < 1:
        raise InputError(f"sample size must be >= 1, got {n}")
    keep = sorted(random.Random(seed).sample(range(len(probes)), n))
    return [probes[i] for i in keep]


def check_probes(probes: Sequence[Probe]) -> list[Probe]:
    """The probes as a list: `InputError` when there are none or two share an id."""
    probes = list(probes)
    if not probes:
        raise InputError("no probes given: expected at least one probe")
    ids = [p.id for p in probes]
    if len(set(ids)) != len(ids):
        raise InputError("probe ids must be unique")
    return probes


def check_unique_ids(sets: Sequence[tuple[str, Sequence[Probe]]]) -> None:
    """`InputError` naming both sets when a probe id is in two of the (label, probes) sets: joined
    results are keyed by probe id, so a repeated id would mix two probes."""
    seen: dict[str, str] = {}
    for label, probes in sets:
        for probe in probes:
            if probe.id in seen:
                raise InputError(f"probe id {probe.id!r} is in both {seen[probe.id]!r} and {label!r}: "
                                 "give each set unique ids")
            seen[probe.id] = label


def select_probes(specs: Sequence[str], *, limit: int | None = None, sample: int | None = None,
                  seed: int = 0) -> list[Probe]:
    """The probes of `specs` (bundled names or probe files): the first `limit` of each set, then a
    seeded `sample` of each set, joined in the given order. Ids must be unique across the sets
    (checked on the first `limit`, before sampling, so a sample never hides a clash)."""
    out: list[Probe] = []
    chosen: list[tuple[str, Sequence[Probe]]] = []
    for spec in specs:
        probes = list(load_probes(str(spec)))[:limit]
        chosen.append((str(spec), probes))
        check_unique_ids(chosen)
        out += sample_probes(probes, sample, seed=seed)
    return out


def join_probe_sets(names: Sequence[str], *, limit: int | None = None) -> ProbeSet:
    """The probe sets `names` (bundled names or files, e.g. the authors' IdioMem file), optionally
    the first `limit` of each, joined as one set named "study". Ids must be unique across the sets."""
    sets = []
    for name in names:
        ps = load_probes(name)
        sets.append(ProbeSet(ps.name, ps.probes[:limit] if limit else ps.probes))
    joined = ProbeSet.concat("study", sets)
    check_unique_ids([(ps.name, ps.probes) for ps in sets])
    return joined

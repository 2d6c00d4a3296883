"""`idiom_lens.datasets.selection`: seeded samples, the first N of each set, unique ids across sets."""

from __future__ import annotations

from pathlib import Path

import pytest

from idiom_lens.datasets import Probe, load_probes
from idiom_lens.datasets.selection import (
    check_probes,
    check_unique_ids,
    join_probe_sets,
    sample_probes,
    select_probes,
)
from idiom_lens.errors import InputError


def _probe(id_: str) -> Probe:
    return Probe(id=id_, prompt="once in a blue", target="moon", kind="idiom")


def test_sample_probes_is_seeded(probes):
    assert sample_probes(probes, 4, seed=3) == sample_probes(probes, 4, seed=3)
    assert sample_probes(probes, 4, seed=3) != sample_probes(probes, 4, seed=4)
    assert sample_probes(probes, None) == list(probes)
    chosen = sample_probes(probes, 4, seed=3)
    assert chosen == sorted(chosen, key=list(probes).index)  # original order kept
    with pytest.raises(InputError, match="sample size must be >= 1"):
        sample_probes(probes, 0)


def test_check_probes() -> None:
    assert check_probes((_probe("a"), _probe("b"))) == [_probe("a"), _probe("b")]
    with pytest.raises(InputError, match="no probes given"):
        check_probes([])
    with pytest.raises(InputError, match="probe ids must be unique"):
        check_probes([_probe("a"), _probe("a")])


def test_check_unique_ids_names_both_sets() -> None:
    check_unique_ids([("one", [_probe("a")]), ("two", [_probe("b")])])
    with pytest.raises(InputError, match=r"probe id 'a' is in both 'one' and 'two': give each set unique ids"):
        check_unique_ids([("one", [_probe("a")]), ("two", [_probe("b"), _probe("a")])])


def test_select_probes_limit_then_sample_per_set() -> None:
    idioms, facts = (list(load_probes(n))[:10] for n in ("idioms", "facts"))
    chosen = select_probes(["idioms", "facts"], limit=10, sample=3, seed=0)
    assert chosen[:3] == sample_probes(idioms, 3, seed=0) and chosen[3:] == sample_probes(facts, 3, seed=0)
    assert select_probes(["idioms"], limit=4) == idioms[:4]


def test_join_probe_sets_first_n_of_each() -> None:
    joined = join_probe_sets(["idioms", "facts"], limit=3)
    assert joined.name == "study"
    assert list(joined.probes) == [*load_probes("idioms").probes[:3], *load_probes("facts").probes[:3]]
    assert len(join_probe_sets(["text"])) == len(load_probes("text"))


def test_a_set_twice_is_refused(tmp_path: Path) -> None:
    """The CLI names a set as given (the path); the study by its set name (the file's stem)."""
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "x", "prompt": "once in a blue", "target": "moon", "kind": "idiom"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=f"is in both '{path}' and '{path}'"):
        select_probes([str(path), str(path)])
    with pytest.raises(InputError, match="probe id 'x' is in both 'mine' and 'mine': give each set unique ids"):
        join_probe_sets([str(path), str(path)])

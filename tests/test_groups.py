"""The comparison sets are named, ordered and coloured once (`idiom_lens.groups`)."""

from __future__ import annotations

import re

from idiom_lens import groups
from idiom_lens.analyses import memorization
from idiom_lens.plots import style


def test_every_group_has_exactly_one_colour() -> None:
    assert len(set(groups.GROUPS)) == len(groups.GROUPS) == 5
    # one entry per set, in the sets' order, then the comparison-only sets, nothing else
    assert list(groups.COLOR) == [*groups.GROUPS, *groups.COMPARISON_SETS]
    colours = list(groups.COLOR.values())
    assert len(set(colours)) == len(colours)  # no two sets share a colour
    assert groups.OTHER_COLOR not in colours
    assert all(re.fullmatch(r"#[0-9a-f]{6}", c) for c in [*colours, groups.OTHER_COLOR])
    assert [groups.group_color(g) for g in (*groups.GROUPS, *groups.COMPARISON_SETS)] == colours
    assert groups.group_color("some other set") == groups.OTHER_COLOR


def test_one_definition_everywhere() -> None:
    assert memorization.GROUPS is groups.GROUPS  # re-exported, not redefined
    assert style.group_color is groups.group_color
    assert {memorization.probe_group(kind, m) for kind in ("idiom", "fact", "text") for m in (True, False)} \
        == set(groups.GROUPS)


def test_ordered_puts_known_sets_first() -> None:
    assert groups.ordered(["zeta", "ordinary text", "memorized idioms", "alpha", "ordinary text"]) == [
        "memorized idioms", "ordinary text", "alpha", "zeta"]

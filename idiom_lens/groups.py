"""The comparison sets of the study, defined once: their names, their order and their colours.

Every analysis, table and figure takes them from here, so a set is named, ordered and coloured
the same way everywhere (`idiom_lens.analyses.memorization.probe_group` assigns a probe its set).
"""

from __future__ import annotations

from collections.abc import Iterable

MEMORIZED_IDIOMS = "memorized idioms"
NON_MEMORIZED_IDIOMS = "non-memorized idioms"
ORDINARY_TEXT = "ordinary text"
MEMORIZED_FACTS = "memorized facts"
NON_MEMORIZED_FACTS = "non-memorized facts"
# Not a memorization group: the non-memorized idioms matched to a memorized sample on final
# confidence (`study.sets`), a comparison set of the causal analyses.
MATCHED_NON_MEMORIZED_IDIOMS = "matched non-memorized idioms"
COMPARISON_SETS: tuple[str, ...] = (MATCHED_NON_MEMORIZED_IDIOMS,)  # coloured after `GROUPS`

# The sets the paper compares, in plotting (and table) order.
GROUPS: tuple[str, ...] = (
    MEMORIZED_IDIOMS,
    NON_MEMORIZED_IDIOMS,
    ORDINARY_TEXT,
    MEMORIZED_FACTS,
    NON_MEMORIZED_FACTS,
)

# One colour per set (plotly's D3 palette), and one for any set not listed above.
COLOR: dict[str, str] = {
    MEMORIZED_IDIOMS: "#d62728",
    NON_MEMORIZED_IDIOMS: "#1f77b4",
    ORDINARY_TEXT: "#7f7f7f",
    MEMORIZED_FACTS: "#ff7f0e",
    NON_MEMORIZED_FACTS: "#17becf",
    MATCHED_NON_MEMORIZED_IDIOMS: "#9467bd",
}
OTHER_COLOR = "#2ca02c"


def group_color(group: str) -> str:
    """The colour of a set (`OTHER_COLOR` for a set not in `GROUPS`)."""
    return COLOR.get(group, OTHER_COLOR)


def ordered(groups: Iterable[str]) -> list[str]:
    """The distinct `groups` in `GROUPS` order, then any others, sorted."""
    present = set(groups)
    return [g for g in GROUPS if g in present] + sorted(present - set(GROUPS))


def slug(group: str) -> str:
    """A set's name as it enters file names: spaces as underscores ("memorized_idioms")."""
    return group.replace(" ", "_")

"""The study's words: Markdown summaries and tables written beside the results."""

from __future__ import annotations

from typing import Any

from idiom_lens.analyses.phases import PhaseAnalysis
from idiom_lens.analyses.trajectory import TrajectoryResult


def summary_markdown(result: TrajectoryResult, phases: PhaseAnalysis) -> str:
    s = result.settings
    memo = result.memorization.summary()
    lines = [
        f"# Recall trajectory: {s.get('model_spec')}",
        "",
        f"Model `{s.get('model_name')}`, {s.get('n_layers')} layers, numerics `{s.get('numerics_mode')}`, "
        f"BOS prepended: {s.get('prepend_bos')}, sites: {', '.join(result.sites)}, read through the "
        f"{result.lens_kind} lens.",
        "",
        "## Memorization (greedy next token == first token of the target word)",
        "",
        markdown_table(memo),
        "",
        "## Two phases",
        "",
        phases.summary_text,
        "",
        markdown_table(phases.group_table()),
        "",
    ]
    if phases.promotion_tests is not None and len(phases.promotion_tests):
        lines += ["## Are memorized probes promoted earlier? (permutation tests)", "",
                  markdown_table(phases.promotion_tests), ""]
    if phases.matching is not None and len(phases.matching):
        lines += ["## Confidence-matched control", "", markdown_table(phases.matching), ""]
    if phases.boundary_sensitivity is not None:
        lines += ["## Boundary vs its top-1 share threshold", "", markdown_table(phases.boundary_sensitivity), ""]
    return "\n".join(lines)


def markdown_table(frame: Any, *, digits: int = 3) -> str:
    """A pipe table (pandas' `to_markdown` would need tabulate for these few lines)."""
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return str(int(v)) if v.is_integer() else f"{v:.{digits}f}"
        return str(v)

    rows = [list(map(str, frame.columns))] + [[fmt(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in rows]
    lines.insert(1, "|" + "---|" * len(frame.columns))
    return "\n".join(lines)

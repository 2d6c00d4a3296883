"""The attention-knockout stage: the last position cut from the idiom's earlier words."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idiom_lens.analyses.interventions.attention_knockouts import MATCHING_RULE, AttentionKnockoutOptions
from idiom_lens.datasets.probes import Probe
from idiom_lens.io import write_json, write_text
from idiom_lens.models.loading import LoadedModel
from idiom_lens.study.parts import sweep_per_probe

if TYPE_CHECKING:
    from idiom_lens.study.executors import Executor


def run_attention_knockout(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    options: AttentionKnockoutOptions = AttentionKnockoutOptions(),
    batch_size: int = 64,
    png: bool = True,
    executor: Executor | None = None,
) -> Any:
    """Attention knockout of `probes` (`options`: the last position cut from each source in windows
    of `options.window` layers); result, summary CSV, the summary over confidence-matched memorized
    and non-memorized idioms (attention_knockout_matched.csv, its pairs in
    attention_knockout_matched_pairs.csv), figure and summary.json under `out`. On `executor`'s
    workers when given: the same files."""
    from idiom_lens.analyses.interventions.attention_knockouts import (
        AttentionKnockoutResult,
        attention_knockout,
        confidence_matched,
    )
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.attention_knockout import attention_knockout_curves

    out = Path(out)
    result = sweep_per_probe(executor, model, probes, out, "attention_knockout",
                    partial(attention_knockout, options=options, batch_size=batch_size),
                    join=AttentionKnockoutResult.join_parts, load=AttentionKnockoutResult.load)
    result.save(out)
    write_text(out / "attention_knockout_summary.csv", result.summary().to_csv(index=False))
    matched = confidence_matched(result)
    write_text(out / "attention_knockout_matched.csv", matched.to_dataframe().to_csv(index=False))
    write_text(out / "attention_knockout_matched_pairs.csv", matched.pairs.to_csv(index=False))
    save_figure(attention_knockout_curves(result), out / "attention_knockout", png=png, width=1300, height=520)
    write_json(out / "summary.json", {"settings": result.settings, "matching": {
        "group": matched.group, "versus": matched.versus, "caliper": matched.caliper, "n_group": matched.n_group,
        "n_candidates": matched.n_candidates, "n_pairs": matched.n_pairs, "rule": MATCHING_RULE}})
    return result

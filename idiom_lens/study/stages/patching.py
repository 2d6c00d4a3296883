"""The patching stage: activation patching (exact or by attribution) of memorized and non-memorized
idioms."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idiom_lens.analyses.interventions.patching import PatchingOptions
from idiom_lens.datasets.probes import Probe
from idiom_lens.faults import maybe_fail
from idiom_lens.groups import slug
from idiom_lens.io import write_json
from idiom_lens.models.loading import LoadedModel
from idiom_lens.study.parts import sweep_per_probe

if TYPE_CHECKING:
    from idiom_lens.study.executors import Executor


def run_patching(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    options: PatchingOptions = PatchingOptions(),
    batch_size: int = 64,
    png: bool = True,
    executor: Executor | None = None,
) -> Any:
    """Activation patching of `probes` (clean idiom -> corrupted prompt), exact or estimated by
    attribution patching (`options.method`); parquet, mean heatmaps per set and summary.json under
    `out`. Returns the `PatchingResult`. On `executor`'s workers when given: the same files."""
    from idiom_lens.analyses.interventions import patch
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.interventions import patching_heatmaps

    out = Path(out)
    from idiom_lens.analyses.interventions.patching import PatchingResult
    result = sweep_per_probe(executor, model, probes, out, f"patching_{options.method}",
                    partial(patch, options=options, batch_size=batch_size),
                    join=PatchingResult.join_parts, load=PatchingResult.load)
    result.save(out)
    maybe_fail("patching.written")
    write_json(out / "summary.json", result.settings | {"skipped": result.skipped.to_dict(orient="records")})
    for variant in options.corruption.variants:
        valid = result.pairs[(result.pairs["variant"] == variant) & result.pairs["valid"]]
        for group in sorted(set(valid["group"])):
            save_figure(patching_heatmaps(result, variant=variant, group=group),
                        out / f"patching_{variant}_{slug(group)}", png=png, width=1300, height=600)
    return result

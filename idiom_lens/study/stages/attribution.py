"""The attribution stage: direct logit attribution of a sample per set, its statistics and figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from idiom_lens.datasets.probes import Probe
from idiom_lens.faults import maybe_fail
from idiom_lens.groups import slug
from idiom_lens.models.loading import LoadedModel

if TYPE_CHECKING:
    pass


def run_attribution(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    top: int = 20,
    batch_size: int = 16,
    png: bool = True,
    progress: bool = True,
) -> dict:
    """Attribute `probes`, write parquet + figures + summary.json under `out`; return the summary."""
    from idiom_lens.analyses import attribution_stats as stats
    from idiom_lens.analyses.attribution import attribute_probes
    from idiom_lens.io import write_json, write_parquet
    from idiom_lens.plots.attribution import layer_contribution_figure, top_neurons_table
    from idiom_lens.plots.export import save_figure

    result = attribute_probes(model, probes, batch_size=batch_size, top_neurons=top, progress=progress)
    out.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in result.save(out)]
    maybe_fail("attribution.written")
    for measure in ("logit", "logit_diff"):
        files.append(str(write_parquet(out / f"layer_stats_{measure}.parquet",
                                       stats.layer_stats(result, measure=measure))))
        files.append(str(write_parquet(out / f"cumulative_share_{measure}.parquet",
                                       stats.cumulative_share(result, measure=measure))))
        files += [str(p) for p in save_figure(layer_contribution_figure(result, measure=measure),
                                              out / f"layers_{measure}", png=png, width=1500, height=560)]
    for group, neurons in result.set_neurons.items():
        fig = top_neurons_table(neurons, title=f"Top neurons, {group} (mean over set)",
                                value_vector_final_norm=result.settings["value_vector_final_norm"])
        stem = out / f"neurons_{slug(group)}"
        files += [str(p) for p in save_figure(fig, stem, png=png, width=1100, height=120 + 26 * max(1, len(neurons)))]
    digest = stats.summary(result)
    digest["files"] = sorted(files)
    write_json(out / "summary.json", digest)
    return digest

"""The lenses stage: the trajectory under the logit lens and each learned lens, compared."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from idiom_lens.analyses.trajectory import (
    TrajectoryResult,
)
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.io import write_json, write_text
from idiom_lens.models.loading import LoadedModel
from idiom_lens.study.stages.trajectory import resumable_trajectory, write_trajectory_outputs

if TYPE_CHECKING:
    from idiom_lens.study.executors import Executor


def run_lenses(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    lenses: Sequence[str] = ("tuned", "jacobian"),
    lens_settings: dict[str, Any] | None = None,
    batch_size: int = 16,
    part_size: int = 256,
    png: bool = True,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> Any:
    """The trajectory of `probes` (`resid_post`) under the logit lens and each learned lens of
    `lenses` (from the cache, trained first when missing, never on a probe), each under
    `out/<lens>/` like the trajectory stage, and their comparison under `out/`: promotion layers,
    boundaries and tests per lens, the held-out KL per layer, the side-by-side figure."""
    from idiom_lens.analyses.lens_comparison import compare_lenses
    from idiom_lens.lenses.cache import LensSettings, bundled_prompts, heldout_table, obtain_lens
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.lenses import heldout_kl_figure, lens_trajectories_figure

    out = Path(out)
    unknown = [k for k in lenses if k not in ("logit", "tuned", "jacobian")]
    if unknown:
        raise InputError(f"lenses {unknown} are unknown: expected tuned and/or jacobian")
    settings = LensSettings(**(lens_settings or {}))
    prompts = sorted(set(bundled_prompts()) | {p.prompt for p in probes})
    trajectories: dict[str, TrajectoryResult] = {}
    kl_tables = []
    for kind in ("logit", *[k for k in lenses if k != "logit"]):
        lens = obtain_lens(model, kind, settings=settings, prompts=prompts, log=log)
        result = resumable_trajectory(model, probes, out / kind, sites=("resid_post",), batch_size=batch_size,
                                      part_size=part_size, lens=lens, log=log, executor=executor)
        write_trajectory_outputs(result, out / kind, title=model.spec, png=png)
        trajectories[kind] = result
        if kind != "logit":
            table = heldout_table(model, kind, settings=settings, prompts=prompts)
            kl_tables.append(table if not kl_tables else table[table["lens"] != "logit"])
    heldout = pd.concat(kl_tables, ignore_index=True) if kl_tables else None
    comparison = compare_lenses(trajectories, heldout_kl=heldout)
    comparison.save(out)
    if heldout is not None:
        save_figure(heldout_kl_figure(comparison, title=f"{model.spec}: held-out KL to the model's output per layer"),
                    out / "heldout_kl", png=png, width=900, height=450)
    save_figure(lens_trajectories_figure(comparison, title=f"{model.spec}: the trajectory under each lens"),
                out / "lens_trajectories", png=png, width=520 * len(trajectories) + 120, height=750)
    text = comparison.summary_text()
    write_text(out / "summary.md", f"# Lenses: {model.spec}\n\n" + text.replace("\n", "\n\n") + "\n")
    write_json(out / "summary.json", {
        "settings": model.settings(), "lens_settings": dataclasses.asdict(settings),
        "lenses": {k: r.lens for k, r in trajectories.items()}, "summary": text,
        "boundaries": comparison.boundaries.to_dict("records"),
        "promotion": comparison.promotion.to_dict("records"),
        "tests": comparison.tests.to_dict("records"),
        "heldout_kl": [] if heldout is None else heldout.to_dict("records"),
    })
    return comparison

"""The interventions stage: neuron knockouts with their controls, the value-vector statistic and
layer skipping."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from idiom_lens.analyses.interventions.knockouts import KnockoutOptions
from idiom_lens.analyses.interventions.value_vectors import VALUE_VECTOR_KS
from idiom_lens.datasets.probes import Probe
from idiom_lens.faults import maybe_fail
from idiom_lens.groups import slug
from idiom_lens.io import write_json
from idiom_lens.models.loading import LoadedModel
from idiom_lens.study.parts import sweep_per_probe

if TYPE_CHECKING:
    from idiom_lens.study.executors import Executor


def run_knockouts(
    model: LoadedModel,
    probes: Sequence[Probe],
    out: Path,
    *,
    options: KnockoutOptions = KnockoutOptions(),
    compare_positions: bool = False,
    value_vector_ks: Sequence[int] = VALUE_VECTOR_KS,
    skip: bool = True,
    batch_size: int = 128,
    png: bool = True,
    log: Callable[[str], None] = print,
    executor: Executor | None = None,
) -> dict:
    """Neuron knockouts (`options`: the grid, targeted, random and norm-matched controls,
    whole-MLP ceiling; by default the post-MLP norm frozen, the primary result), the value-vector
    statistic and layer skipping of `probes`; parquet, figures and summary.json under `out`, each
    written as soon as its step completes. knockout_layers.parquet holds, per set, control and
    layer, the share changed and the mean output diagnostics (neurons zeroed, removed norm, output
    cosine and norm ratio, removed-norm ratio to the targeted set).

    `compare_positions` also runs the other positions ("last" beside "all", or the reverse), written
    as knockouts_<positions>*.parquet, with side-by-side figures (`knockout_positions_heatmaps`).
    Layer skipping takes the grid's window lengths that fit the model, at every position.
    The knockouts, the value vectors and layer skipping run in resumable parts
    (`parts.sweep_per_probe`), on `executor`'s workers when given: the same files."""
    from idiom_lens.analyses.interventions import (
        KnockoutResult,
        SkipOptions,
        knockout_grid,
        skip_layers,
        value_vector_ranks,
    )
    from idiom_lens.analyses.interventions.skipping import SkipResult
    from idiom_lens.analyses.interventions.value_vectors import ValueVectorRanks
    from idiom_lens.io import write_parquet
    from idiom_lens.plots import save_figure
    from idiom_lens.plots.interventions import (
        knockout_heatmaps,
        knockout_layer_curves,
        knockout_positions_heatmaps,
        skip_curves,
    )

    out = Path(out)
    summary: dict[str, Any] = {"n_probes": len(probes)}
    started = time.perf_counter()
    positions = options.positions

    def grid_run(opts: KnockoutOptions) -> KnockoutResult:
        return sweep_per_probe(executor, model, probes, out, f"knockouts_{opts.positions}",
                      partial(knockout_grid, options=opts, batch_size=batch_size), join=KnockoutResult.join_parts,
                      load=KnockoutResult.load)

    knock = grid_run(options)
    knock.save(out)
    summary["knockouts"] = knock.settings
    write_json(out / "summary.json", summary)
    maybe_fail("knockouts.written")
    log(f"  knockouts ({positions} positions, post-MLP norm {options.norm}, {options.ablation} ablation, ranked by "
        f"{options.rank_by}): {len(probes)} probes x {knock.settings['n_configs']} configurations in "
        f"{knock.settings['seconds']:.1f} s ({1000 * knock.settings['seconds'] / max(1, len(knock.rows)):.1f} ms "
        "per configuration)")
    table = knock.summary()
    for mode in sorted(set(table["mode"])):
        for k in sorted(set(table.loc[(table["mode"] == mode) & (table["control"] != "whole_mlp"), "k"])):
            save_figure(knockout_heatmaps(knock, k=k, mode=mode), out / f"knockout_{mode}_k{k}", png=png, height=900)
    zero_ks = sorted(set(table.loc[(table["mode"] == "zero_top") & (table["control"] == "targeted"), "k"]))
    if zero_ks and 1 in set(table["window"]):
        k_curve = 100 if 100 in zero_ks else zero_ks[-1]
        layers = knock.layer_table(k=k_curve, window=1)
        write_parquet(out / "knockout_layers.parquet", layers)
        summary["share_changed_by_layer"] = {"k": k_curve, "window": 1, "rows": layers.to_dict(orient="records")}
        save_figure(knockout_layer_curves(knock, k=k_curve, window=1), out / f"knockout_layers_k{k_curve}", png=png,
                    height=500)
    if compare_positions:
        other = "last" if positions == "all" else "all"
        second = grid_run(dataclasses.replace(options, positions=other))
        second.save(out, name=f"knockouts_{other}")
        summary[f"knockouts_{other}"] = second.settings
        both = KnockoutResult.stack_runs([knock, second])
        present = list(dict.fromkeys(knock.probes["group"]))
        memorized = [g for g in ("memorized idioms", "memorized facts") if g in present] or present[:1]
        for group in memorized:
            for k in zero_ks:
                save_figure(knockout_positions_heatmaps(both, k=k, group=group),
                            out / f"knockout_positions_{slug(group)}_k{k}", png=png, height=500)
        log(f"  knockouts ({other} positions): {second.settings['seconds']:.1f} s")
    if value_vector_ks and model.masked:
        summary["value_vectors"] = {"not_run": "the value-vector statistic projects W_out rows through the "
                                              "unembedding; a masked LM reads through its MLM head's nonlinear "
                                              "transform first, so the projection is not its read-out"}
        log(f"  value vectors: not run on a masked LM: {summary['value_vectors']['not_run']}")
    elif value_vector_ks:
        vv = sweep_per_probe(executor, model, probes, out, "value_vectors",
                             partial(value_vector_ranks, ks=value_vector_ks, rank_by=options.rank_by),
                             join=ValueVectorRanks.join_parts, load=ValueVectorRanks.load)
        vv.save(out)
        summary["value_vectors"] = vv.settings
    if skip:
        skip_windows = tuple(w for w in options.grid.windows if w <= model.n_layers) or (1,)
        skipped = sweep_per_probe(executor, model, probes, out, "skipping",
                                  partial(skip_layers, options=SkipOptions(windows=skip_windows),
                                          batch_size=min(batch_size, 64)),
                                  join=SkipResult.join_parts, load=SkipResult.load)
        skipped.save(out)
        maybe_fail("skipping.written")
        summary["skipping"] = skipped.settings
        save_figure(skip_curves(skipped), out / "skip_curves", png=png, height=550)
        log(f"  layer skipping: {skipped.settings['n_spans']} spans in {skipped.settings['seconds']:.1f} s")
    summary["total_seconds"] = round(time.perf_counter() - started, 2)
    best = table[(table["mode"] == "zero_top")].groupby(["group", "control"])["changed"].max().reset_index()
    summary["max_share_changed_zero_top"] = best.to_dict(orient="records")
    write_json(out / "summary.json", summary)
    return summary

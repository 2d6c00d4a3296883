"""Fault injection for crash tests: kill the process at a named point, as a crash would.

With ``IDIOM_LENS_FAULT=<point>`` set, the process sends itself SIGKILL the first time it reaches
that point: no exception, no `finally`, no cleanup, which is what an out-of-memory kill or a
power cut leaves on disk. The tests use it to check that a rerun after such a kill gives the
results of an uninterrupted run. Unset (the normal case), `maybe_fail` returns at once.

Points, each where the files on disk differ from every other point's:

- ``trajectory.part``: a trajectory part's parquet files and marker are written, the next part
  is not started (`stages.resumable_trajectory`);
- ``knockouts.written``: knockout tables and a first `summary.json` are written; figures, layer
  skipping and the final summary are not (`stages.run_knockouts`);
- ``skipping.written``: the layer-skipping tables are written too; its figure and the final
  summary are not (`stages.run_knockouts`);
- ``patching.written``: the patching tables are written; summary and figures are not
  (`stages.run_patching`);
- ``attribution.written``: the attribution tables are written; statistics, figures and summary
  are not (`stages.run_attribution`);
- ``tracing.part``: a causal-tracing part's parquet files and marker are written, the next part
  is not started (`stages.run_tracing`);
- ``lens.checkpoint``: a tuned-lens training checkpoint is written, the next step is not taken
  (`lenses.train.train_tuned_lens`);
- ``stage.outputs``: a stage function returned (every output written), its completion marker
  is not written yet (`study.parts.run_stage`).

The analyses themselves (`knockout_grid`, `skip_layers`, ...) write nothing until they return,
so a kill anywhere inside them leaves the files of a kill just before their results are written.
Between the points, a kill can also leave the hidden temporary file of a write in progress
(`io.atomic_write`), which no marker lists and a recomputed stage or part removes.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "IDIOM_LENS_FAULT"

POINTS: frozenset[str] = frozenset({
    "trajectory.part", "knockouts.written", "skipping.written", "patching.written",
    "attribution.written", "tracing.part", "lens.checkpoint", "stage.outputs",
})


def maybe_fail(point: str) -> None:
    """SIGKILL this process if ``IDIOM_LENS_FAULT`` names `point`."""
    name = os.environ.get(ENV)
    if not name:
        return
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r} (add it to idiom_lens.faults.POINTS)")
    if name not in POINTS:
        raise ValueError(f"{ENV}={name!r} names no fault point; known: {', '.join(sorted(POINTS))}")
    if name == point:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

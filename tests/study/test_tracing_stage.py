"""The tracing stage's noise effects: resumable parts joined give one call's rows, and a rerun
reuses them; the tracing stage writes the restored share with its floor."""

from __future__ import annotations

import pandas as pd

from idiom_lens.analyses.interventions.noise_designs import NoiseEffectsResult, noise_effects, noise_scale
from idiom_lens.analyses.interventions.tracing import TracingOptions, TracingResult
from idiom_lens.study.stages.tracing import run_noise_effects, run_tracing


def test_noise_effects_in_parts_equal_one_call(tiny_model, probes, tmp_path):
    chosen = probes[:3]
    log: list[str] = []
    staged = run_noise_effects(tiny_model, chosen, tmp_path, noise_samples=2, part_size=1, png=False, log=log.append)
    whole = noise_effects(tiny_model, chosen, noise_samples=2, scale=noise_scale(tiny_model))
    pd.testing.assert_frame_equal(staged.rows, whole.rows)  # the same noise per probe, whatever the parts
    assert staged.probes.equals(whole.probes) and staged.settings["n_probes"] == 3
    again = NoiseEffectsResult.load(tmp_path)
    assert again.rows.equals(staged.rows)
    assert (tmp_path / "noise_effects.fig.json").is_file()
    log.clear()
    run_noise_effects(tiny_model, chosen, tmp_path, noise_samples=2, part_size=1, png=False, log=log.append)
    assert sum("reusing" in line for line in log) == 3


def test_tracing_stage_writes_the_restored_share(tiny_model, probes, tmp_path):
    options = TracingOptions(sites=("mlp",), windows=(2,), noise_samples=2, positions="key")
    result = run_tracing(tiny_model, probes[:2], tmp_path, options=options, min_total_effect=0.02, png=False,
                         log=lambda line: None)
    share = pd.read_parquet(tmp_path / "tracing_share.parquet")
    pd.testing.assert_frame_equal(share, result.restored_share(min_total_effect=0.02))
    assert TracingResult.load(tmp_path).rows.equals(result.rows)

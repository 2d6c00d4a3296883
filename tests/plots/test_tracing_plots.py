"""Causal-tracing figures are drawn from result objects alone (built by hand here: no model) and
show what the results hold: the restored share with its floor, the noise effects per design."""

from __future__ import annotations

import pandas as pd
import pytest

from idiom_lens.analyses.interventions.noise_designs import NoiseEffectsResult
from idiom_lens.analyses.interventions.tracing import TracingResult
from idiom_lens.errors import InputError
from idiom_lens.groups import group_color
from idiom_lens.plots.export import save_figure
from idiom_lens.plots.tracing import noise_effects_figure, restored_share_curves, tracing_curves


def _tracing() -> TracingResult:
    # probe: (group, total effect, IE at the last token per layer)
    probes = {"a": ("memorized idioms", 0.5, (0.1, 0.4)), "b": ("memorized idioms", 0.1, (0.02, 0.05)),
              "c": ("memorized idioms", 0.0, (0.0, 0.0)), "d": ("ordinary text", 0.2, (0.05, 0.1))}
    rows = [{"probe_id": pid, "site": "mlp", "window": 1, "layer": layer, "pos": 3, "position": "last", "ie": ie}
            for pid, (_, _, ies) in probes.items() for layer, ie in enumerate(ies)]
    table = pd.DataFrame([{"probe_id": pid, "kind": "idiom" if g.startswith("memorized") else "text", "group": g,
                           "total_effect": te} for pid, (g, te, _) in probes.items()])
    return TracingResult(rows=pd.DataFrame(rows), probes=table, settings={"specs": [["mlp", 1]]})


def test_restored_share_curves_draw_the_share_and_name_the_dropped(tmp_path):
    fig = restored_share_curves(_tracing(), position="last", min_total_effect=0.05)
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    by_name = {t.name: t for t in lines}
    # memorized: c (TE 0) dropped; layer 1: (0.4 + 0.05) / 2 over (0.5 + 0.1) / 2 = 0.75
    memorized = by_name["memorized idioms (n = 2, 1 dropped)"]
    assert list(memorized.y) == pytest.approx([0.12 / 0.6, 0.75])
    assert memorized.line.color == group_color("memorized idioms")
    assert list(by_name["ordinary text (n = 1)"].y) == pytest.approx([0.25, 0.5])
    assert ">= 0.05" in fig.layout.title.text
    aie = tracing_curves(_tracing(), position="last")
    names = [t.name for t in aie.data if t.mode == "lines+markers"]
    assert names == ["memorized idioms (n = 3)", "ordinary text (n = 1)"]  # raw IE: every probe counts
    save_figure(fig, tmp_path / "share", png=False)
    assert (tmp_path / "share.html").is_file()
    with pytest.raises(InputError, match="position"):
        restored_share_curves(_tracing(), position="first")


def test_noise_effects_figure_shows_each_design_and_word():
    rows = []
    for pid, n, each, span in (("a", 3, (0.1, 0.4, 0.2), 0.6), ("b", 2, (0.3, 0.1), 0.5)):
        rows.append({"probe_id": pid, "design": "all_but_last", "word": -1, "word_from_end": pd.NA,
                     "total_effect": span, "logprob_change": -span, "pred_changed": 1.0})
        rows += [{"probe_id": pid, "design": "each_word", "word": w, "word_from_end": w - n, "total_effect": te,
                  "logprob_change": -te, "pred_changed": 0.0} for w, te in enumerate(each)]
    probes = pd.DataFrame([{"probe_id": p, "kind": "idiom", "group": "memorized idioms"} for p in ("a", "b")])
    result = NoiseEffectsResult(rows=pd.DataFrame(rows).astype({"word_from_end": "Int64"}), probes=probes,
                                settings={"noise_sigma": 1.0, "samples": 2, "model_name": "tiny"})
    fig = noise_effects_figure(result)
    span, words, best = fig.data
    assert list(span.x) == ["all_but_last"] and list(span.y) == pytest.approx([0.55])
    assert list(words.x) == ["word -3", "word -2", "word -1"]
    assert list(words.y) == pytest.approx([0.1, 0.35, 0.15])  # word -2: 0.4 and 0.3; word -1: 0.2 and 0.1
    assert list(best.y) == pytest.approx([0.35])  # a's 0.4, b's 0.3
    assert span.showlegend and not words.showlegend
    with pytest.raises(InputError, match="measure"):
        noise_effects_figure(result, measure="rank")

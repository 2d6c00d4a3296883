"""The localizer stages: every method runs, resumes, and reads back as one per-layer table."""

from __future__ import annotations

import pytest

from idiom_lens.analyses.recall import RecallProfile
from idiom_lens.errors import InputError
from idiom_lens.study.localizers import LocalizerOptions, localizer_profile, localizer_stages, run_localizers


def test_options_are_checked():
    with pytest.raises(InputError, match="norms"):
        LocalizerOptions(norms=("warm",))
    with pytest.raises(InputError, match="lenses"):
        LocalizerOptions(lenses=("crystal",))
    with pytest.raises(InputError, match="window"):
        LocalizerOptions(window=0)
    with pytest.raises(InputError, match="tuned lens"):
        localizer_stages(LocalizerOptions(lenses=("tuned",)))


def test_stages_follow_the_options():
    names = [s.name for s in localizer_stages(LocalizerOptions())]
    assert names == ["knockouts_frozen", "knockouts_live", "tracing", "noise_effects", "attention_knockout_w1",
                     "attention_knockout_w5", "attribution"]
    names = [s.name for s in localizer_stages(LocalizerOptions(norms=("frozen",), noise_effects=False, window=1,
                                                               lenses=("logit",), knockout_controls=("whole_mlp",)))]
    assert names == ["knockouts_frozen", "tracing", "attention_knockout_w1", "attribution", "trajectory_logit"]
    names = [s.name for s in localizer_stages(LocalizerOptions(noise_effects=False, single_layer_attention=False))]
    assert names == ["knockouts_frozen", "knockouts_live", "tracing", "attention_knockout_w5", "attribution"]
    stages = localizer_stages(LocalizerOptions(patching=True, seed=3))
    assert stages[-1].name == "patching_attribution"
    patching = stages[-1].options["options"]
    assert (patching.method, patching.sites, patching.corruption.seed) == ("attribution", ("attn_out", "mlp_out"), 3)
    knock = localizer_stages(LocalizerOptions(knockout_controls=("matched", "whole_mlp")))[0].options["options"]
    assert knock.controls == ("matched", "whole_mlp")
    with pytest.raises(InputError, match="controls"):
        localizer_stages(LocalizerOptions(knockout_controls=("lucky",)))


def test_run_then_profile_then_resume(tiny_model, tiny_model_compat, probes, tmp_path):
    sample = [probes[3], probes[5], probes[4]]  # the first two have corruptions attribution patching keeps
    options = LocalizerOptions(norms=("frozen",), window=2, noise_samples=2, noise_effects=False, lenses=("logit",),
                               knockout_controls=("matched", "whole_mlp"), patching=True)
    loads = []

    def compat():
        loads.append(1)
        return tiny_model_compat

    logged: list[str] = []
    seconds = run_localizers(tiny_model, sample, tmp_path, options, compat=compat, log=logged.append)
    assert set(seconds) == {s.name for s in localizer_stages(options)}
    assert loads == [1]
    sets = {"implant": [p.id for p in sample[:2]], "control": [sample[2].id]}
    profile = localizer_profile(tmp_path, sets=sets, window=2, min_total_effect=1e-9)
    assert isinstance(profile, RecallProfile)
    measures = set(profile.per_probe["measure"])
    assert {"knockout top-100", "knockout whole MLP", "tracing MLP share (last)", "attention knockout",
            "DLA MLP share", "logit lens gain", "logit lens MLP gain", "attribution patching MLP share (last)"} \
        <= measures
    assert set(profile.per_probe["group"]) == {"implant", "control"}
    # a second run reuses every stage
    logged.clear()
    run_localizers(tiny_model, sample, tmp_path, options, compat=compat, log=logged.append)
    assert sum("already done" in line for line in logged) == len(seconds)

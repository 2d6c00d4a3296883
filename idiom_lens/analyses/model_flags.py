"""Optional model-based `prompt_comp_ind`: is the prompt reducible for a given model?

Method.md criterion 2 asks that the target be unique only when the whole prompt is given. This
tests it directly: the probe is shortened to each proper tail of its prompt (its last k words,
k = 1 .. n-2 for an n-1 word prompt) and scored like a probe (greedy next token vs the target's
first token, `idiom_lens.analyses.memorization`). When the model predicts the target from some tail, part
of the prompt already gives the target and the flag is True.

It needs a model, so the bundled files do not use it (they rebuild without one). On the authors'
IdioMem file, the embedded Gemma 3 270M gives Cohen's kappa 0.49 with their `prompt_comp_ind`
against 0.17 for the lexical rule (docs/datasets.md, `experiments/flag_agreement.py`).

    from idiom_lens.models.loading import load_model
    from idiom_lens.datasets import load_probes
    from idiom_lens.analyses.model_flags import tail_prompt_comp, with_model_prompt_comp

    model = load_model("gemma-3-270m")
    probes = load_probes("idioms")
    comp = tail_prompt_comp(model, probes)           # {probe id: bool}
    flagged = with_model_prompt_comp(probes, comp)   # same probes, flags replaced
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from idiom_lens.analyses.memorization import score_memorization
from idiom_lens.datasets.probes import Probe, ProbeSet
from idiom_lens.models.loading import LoadedModel


def prompt_tails(probe: Probe) -> list[Probe]:
    """The probe with its prompt cut to each proper tail (last 1 .. n-2 words), ids `{id}#tail{k}`."""
    words = probe.prompt.split()
    return [
        Probe(id=f"{probe.id}#tail{k}", prompt=" ".join(words[-k:]), target=probe.target, kind=probe.kind,
              source=probe.source)
        for k in range(1, len(words))
    ]


def tail_prompt_comp(
    model: LoadedModel,
    probes: Iterable[Probe],
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> dict[str, bool]:
    """{probe id: True when `model` predicts the target from some proper tail of the prompt}.

    A one-word prompt has no proper tail: its flag is False.
    """
    probes = list(probes)
    tails = [tail for probe in probes for tail in prompt_tails(probe)]
    result = score_memorization(model, tails, batch_size=batch_size, progress=progress) if tails else None
    hits = {r.probe_id.rsplit("#tail", 1)[0] for r in (result.records if result else ()) if r.memorized}
    return {probe.id: probe.id in hits for probe in probes}


def with_model_prompt_comp(probes: ProbeSet | Sequence[Probe], comp: dict[str, bool]) -> ProbeSet:
    """The probes with `prompt_comp_ind` from `comp` and `hard_to_guess` recomputed.

    `hard_to_guess` stays False for probes that are not single-target (loader rule); a probe
    missing from `comp` is an error, so a partial result cannot pass silently.
    """
    missing = [p.id for p in probes if p.id not in comp]
    if missing:
        raise KeyError(f"no model flag for {len(missing)} probe(s), e.g. {missing[:3]}")
    out = []
    for p in probes:
        flag = comp[p.id]
        hard = (None if p.similarity_ind is None
                else (not flag and not p.similarity_ind and p.single_target is not False))
        out.append(replace(p, prompt_comp_ind=flag, hard_to_guess=hard))
    name = probes.name if isinstance(probes, ProbeSet) else "probes"
    return ProbeSet(f"{name}+model_prompt_comp", tuple(out))

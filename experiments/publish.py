"""Rewrite docs/ from the runs of `experiments/regenerate.py`: the claims file, the result pages,
the figures and the regeneration record. Nothing here computes a statistic; it reads the tables
the runs wrote and formats them.

    docs/claims.json        every number a page may cite: {"commands": step -> command,
                            "claims": name -> value, text, n, interval, step, source}
                            (tests/test_docs.py checks the prose against it)
    docs/results/*.md       the runs' own tables and summaries, one page per run
    docs/figures/*.png      the figures the pages show, copied from the runs
    docs/regeneration.md    what ran, with which command, how long, at which commit

A claim's `text` is how the prose writes it, e.g. `0.415 [0.393, 0.437]` (a share and its 95%
interval) or `+1.16 [+0.98, +1.34]` (a difference in layers). Prose cites a claim as
`<!--claim:NAME-->TEXT<!--/claim-->`; the comments do not render.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

MODELS = ("gemma-3-270m", "smollm2-135m")


# ----------------------------------------------------------------------------------------------
# Formatting: one function per kind of number, so prose and claims agree by construction
# ----------------------------------------------------------------------------------------------

def slug(text: str) -> str:
    """`non-memorized idioms` -> `non_memorized_idioms`: claim names are dotted slugs."""
    return re.sub(r"[^a-z0-9]+", "_", str(text).lower()).strip("_")


def share(value: float) -> str:
    return f"{value:.3f}"


def share_ci(value: float, lo: float, hi: float) -> str:
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def short_ci(value: float, lo: float, hi: float) -> str:
    return f"{value:.2f} [{lo:.2f}, {hi:.2f}]"


def signed_ci(value: float, lo: float, hi: float) -> str:
    return f"{value:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def p_text(p: float, n_permutations: int | None = None) -> str:
    """`p = 0.07`, or `p < 1e-3` where the permutations cannot resolve smaller."""
    if p < 1e-3:
        return "p < 1e-3"
    return f"p = {p:.2g}" if p < 0.1 else f"p = {p:.2f}"


def _layer(value: Any) -> str:
    """A layer number, or `none` where no layer qualifies (e.g. no phase boundary)."""
    return "none" if value is None or pd.isna(value) else str(int(value))


def _number(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    return value


class Claims:
    """The claims file being written: `add` one number with where it came from. `commands`: the
    regeneration's step names and their commands; a claim names its step, and the file holds each
    command once (12,000 claims repeating their command made the file 2 MB larger)."""

    REGENERATE = "regenerate"

    def __init__(self, commands: dict[str, str]) -> None:
        self.items: dict[str, dict[str, Any]] = {}
        self.commands = {**commands, self.REGENERATE: "python experiments/regenerate.py --out published"}
        self._step_of = {command: name for name, command in self.commands.items()}

    def add(self, name: str, *, value: Any, text: str, command: str, source: str, n: int | None = None,
            interval: tuple[float, float] | None = None, what: str = "") -> None:
        if name in self.items:
            raise ValueError(f"claim {name!r} written twice")
        if command not in self._step_of:
            raise ValueError(f"claim {name!r}: the command {command!r} is no step of the regeneration")
        self.items[name] = {
            "value": _number(value), "text": text, "n": None if n is None else int(n),
            "interval": None if interval is None else [_number(interval[0]), _number(interval[1])],
            "interval_kind": what or None, "step": self._step_of[command], "source": source,
        }

    def write(self, path: Path) -> None:
        from idiom_lens.io import write_text

        used = sorted({item["step"] for item in self.items.values()})
        commands = json.dumps({step: self.commands[step] for step in used}, indent=1, sort_keys=True)
        lines = [f"{json.dumps(name)}: {json.dumps(item, sort_keys=True)}" for name, item in sorted(self.items.items())]
        # one claim per line: diffs read well
        write_text(path, '{"commands": ' + commands + ',\n"claims": {\n' + ",\n".join(lines) + "\n}}\n")


# ----------------------------------------------------------------------------------------------
# Reading the runs
# ----------------------------------------------------------------------------------------------

def _table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make results` (experiments/regenerate.py) first")
    return pd.read_parquet(path)


def _json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run `make results` (experiments/regenerate.py) first")
    return json.loads(path.read_text())


def study_claims(claims: Claims, out: Path, model: str, command: str) -> None:
    """Memorization, the two phases, the lens comparison and attribution of one model's study."""
    from idiom_lens.analyses.stats import wilson_interval

    root = out / "study" / model
    rel = lambda p: str(p.relative_to(out))  # noqa: E731
    memo_path = root / "trajectory" / "memorization_summary.parquet"
    for row in _table(memo_path).itertuples():
        lo, hi = (float(x) for x in wilson_interval(int(row.memorized), int(row.n)))
        base = f"{model}.memorized.{slug(row.kind)}.{slug(row.subset)}"
        claims.add(base, value=row.fraction, text=share_ci(row.fraction, lo, hi), n=row.n, interval=(lo, hi),
                   what="Wilson 95%", command=command, source=rel(memo_path))
        claims.add(f"{base}.count", value=int(row.memorized), text=f"{int(row.memorized):,}", n=row.n,
                   command=command, source=rel(memo_path))
        claims.add(f"{base}.n", value=int(row.n), text=f"{int(row.n):,}", command=command, source=rel(memo_path))

    summary_path = root / "trajectory" / "summary.json"
    phases = _json(summary_path)["phases"]
    claims.add(f"{model}.boundary_layer", value=phases["boundary_layer"], text=_layer(phases["boundary_layer"]),
               command=command, source=rel(summary_path))
    claims.add(f"{model}.n_layers", value=phases["n_layers"], text=str(phases["n_layers"]), command=command,
               source=rel(summary_path))
    for row in phases["boundary_sensitivity"]:
        claims.add(f"{model}.boundary_layer.at_{round(100 * row['top1_share'])}pct", value=row["boundary_layer"],
                   text=_layer(row["boundary_layer"]), command=command, source=rel(summary_path))
    for row in phases["groups"]:
        base = f"{model}.promotion.{slug(row['group'])}"
        claims.add(f"{base}.median", value=row["median_promotion_layer"], text=f"{row['median_promotion_layer']:g}",
                   n=row["n"], command=command, source=rel(summary_path))
        claims.add(f"{base}.confidence_gain", value=row["mean_confidence_gain"],
                   text=f"{row['mean_confidence_gain']:+.2f}", n=row["n"], command=command, source=rel(summary_path))

    curves_path = root / "trajectory" / "phases_curves.parquet"
    curves = _table(curves_path)
    probs = curves[curves["metric"] == "pred_prob"]
    last = int(probs["layer"].max())
    layers = {"last": last}
    if phases["boundary_layer"] is not None:
        layers["boundary"] = int(phases["boundary_layer"])
    for row in probs[probs["layer"].isin(set(layers.values()))].itertuples():
        for label, layer in layers.items():
            if row.layer == layer:
                claims.add(f"{model}.pred_prob.{slug(row.group)}.{label}", value=row.mean, n=row.n,
                           text=short_ci(row.mean, row.mean_low, row.mean_high), interval=(row.mean_low, row.mean_high),
                           what="bootstrap 95%", command=command, source=rel(curves_path))

    tests_path = root / "trajectory" / "phases_promotion_tests.parquet"
    for row in _table(tests_path).itertuples():
        base = f"{model}.promotion_test.{slug(row.control)}.{slug(row.group)}.vs.{slug(row.versus)}"
        claims.add(base, value=row.mean_diff, text=signed_ci(row.mean_diff, row.mean_diff_low, row.mean_diff_high),
                   n=row.n_a, interval=(row.mean_diff_low, row.mean_diff_high), what="bootstrap 95%",
                   command=command, source=rel(tests_path))
        claims.add(f"{base}.p", value=row.p_value, text=p_text(row.p_value), command=command, source=rel(tests_path))
        claims.add(f"{base}.p_adjusted", value=row.p_adjusted, text=p_text(row.p_adjusted), command=command,
                   source=rel(tests_path), what=f"{row.correction} over {row.family}")
        claims.add(f"{base}.n_a", value=row.n_a, text=f"{int(row.n_a):,}", command=command, source=rel(tests_path))
        claims.add(f"{base}.n_b", value=row.n_b, text=f"{int(row.n_b):,}", command=command, source=rel(tests_path))
        for total in ("n_a_total", "n_b_total"):
            claims.add(f"{base}.{total}", value=int(getattr(row, total)), text=f"{int(getattr(row, total)):,}",
                       command=command, source=rel(tests_path))
    family = _table(tests_path)["family_size"]
    claims.add(f"{model}.promotion_test.family_size", value=int(family.max()), text=str(int(family.max())),
               command=command, source=rel(tests_path))
    fact_claims(claims, out, model, command)

    lens_tests_path = root / "lenses" / "lens_tests.parquet"
    for row in _table(lens_tests_path).itertuples():
        base = f"{model}.lens.{row.lens}.{slug(row.control)}.{slug(row.group)}.vs.{slug(row.versus)}"
        claims.add(base, value=row.mean_diff, text=signed_ci(row.mean_diff, row.mean_diff_low, row.mean_diff_high),
                   interval=(row.mean_diff_low, row.mean_diff_high), what="bootstrap 95%", command=command,
                   source=rel(lens_tests_path))
        claims.add(f"{base}.p", value=row.p_value, text=p_text(row.p_value), command=command,
                   source=rel(lens_tests_path))
        if "p_adjusted" in kl_or_tests_columns(lens_tests_path):
            claims.add(f"{base}.p_adjusted", value=row.p_adjusted, text=p_text(row.p_adjusted), command=command,
                       source=rel(lens_tests_path))
    bounds_path = root / "lenses" / "lens_boundaries.parquet"
    for row in _table(bounds_path).itertuples():
        value = None if pd.isna(row.boundary_layer) else int(row.boundary_layer)
        claims.add(f"{model}.lens.{row.lens}.boundary_layer", value=value, text=_layer(value), command=command,
                   source=rel(bounds_path))
    kl_path = root / "lenses" / "lens_heldout_kl.parquet"
    kl = _table(kl_path)
    claims.add(f"{model}.heldout_kl.n_tokens", value=int(kl["n_tokens"].iloc[0]),
               text=f"{int(kl['n_tokens'].iloc[0]):,}", command=command, source=rel(kl_path))
    claims.add(f"{model}.heldout_kl.n_sentences", value=int(kl["n_sentences"].iloc[0]),
               text=str(int(kl["n_sentences"].iloc[0])), command=command, source=rel(kl_path))
    for row in kl.itertuples():
        claims.add(f"{model}.heldout_kl.{row.lens}.layer{row.layer}", value=row.kl,
                   text=f"{row.kl:.1f}" if row.kl >= 10 else f"{row.kl:.2f}", interval=(row.kl_low, row.kl_high),
                   what="bootstrap 95% over sentences", n=row.n_tokens, command=command, source=rel(kl_path))

    attribution_path = root / "attribution" / "summary.json"
    attribution = _json(attribution_path)
    error = attribution["invariant_max_abs_error"]["logit"]
    claims.add(f"{model}.attribution.max_sum_error", value=error, text=f"{error:.1e}", command=command,
               source=rel(attribution_path))
    for row in attribution["component_shares"]["logit"]:
        base = f"{model}.attribution.{slug(row['group'])}"
        for part in ("mlp", "attn", "early_mlp", "embed"):
            value = row[f"{part}_share"]
            claims.add(f"{base}.{part}_share", value=value, n=row["n"], interval=(row[f"{part}_share_low"],
                       row[f"{part}_share_high"]), what="bootstrap 95%", command=command, source=rel(attribution_path),
                       text=short_ci(value, row[f"{part}_share_low"], row[f"{part}_share_high"]))
        claims.add(f"{base}.n", value=row["n"], text=str(row["n"]), command=command, source=rel(attribution_path))
        claims.add(f"{base}.early_layers", value=row["early_layers"], text=str(row["early_layers"]), command=command,
                   source=rel(attribution_path))
        claims.add(f"{base}.half_built_at_layer", value=row["half_built_at_layer"],
                   text=str(row["half_built_at_layer"]), command=command, source=rel(attribution_path))


def kl_or_tests_columns(path: Path) -> list[str]:
    return list(_table(path).columns)


def fact_claims(claims: Claims, out: Path, model: str, command: str) -> None:
    """Facts within content-word predictions and against each relation's majority answer: the
    non-memorized facts mostly predict a function word (" the"), so the plain comparison of
    memorized with non-memorized facts compares content answers with function words."""
    from idiom_lens.analyses.stats import compare_samples
    from idiom_lens.datasets import load_probes
    from idiom_lens.io import write_parquet
    from idiom_lens.study.layout import StudyFolder

    root = out / "study" / model / "trajectory"
    memo = StudyFolder.open(out / "study").model(model).memorization()
    source = str(root.relative_to(out))
    shares = memo.function_word_shares()
    for row in shares.itertuples():
        claims.add(f"{model}.function_word.{slug(row.group)}", value=row.share, n=row.n,
                   text=short_ci(row.share, row.share_low, row.share_high), interval=(row.share_low, row.share_high),
                   what="Wilson 95%", command=command, source=source)
    baselines = memo.relation_baselines(load_probes("facts"))
    write_parquet(out / "study" / model / "fact_baselines.parquet", baselines)
    for row in baselines.itertuples():
        base = f"{model}.facts.{slug(row.relation)}"
        claims.add(f"{base}.majority_share", value=row.majority_share, n=row.n, what="Wilson 95%",
                   text=short_ci(row.majority_share, row.majority_share_low, row.majority_share_high),
                   interval=(row.majority_share_low, row.majority_share_high), command=command, source=source)
        claims.add(f"{base}.memorized", value=row.fraction, n=row.n, what="Wilson 95%",
                   text=short_ci(row.fraction, row.fraction_low, row.fraction_high),
                   interval=(row.fraction_low, row.fraction_high), command=command, source=source)
        claims.add(f"{base}.memorized_content", value=row.fraction_content, n=row.n_content, what="Wilson 95%",
                   text=short_ci(row.fraction_content, row.fraction_content_low, row.fraction_content_high),
                   interval=(row.fraction_content_low, row.fraction_content_high), command=command, source=source)
        claims.add(f"{base}.n", value=int(row.n), text=str(int(row.n)), command=command, source=source)
    # promotion of memorized vs non-memorized facts, both predicting a content word
    per_probe = _table(root / "phases_per_probe.parquet")
    content = memo.to_dataframe()[["probe_id", "pred_is_function_word"]]
    per_probe = per_probe.merge(content, on="probe_id")
    per_probe = per_probe[~per_probe["pred_is_function_word"].astype(bool)]
    a = per_probe.loc[per_probe["group"] == "memorized facts", "promotion_layer"].to_numpy(float)
    b = per_probe.loc[per_probe["group"] == "non-memorized facts", "promotion_layer"].to_numpy(float)
    if len(a) >= 2 and len(b) >= 2:
        test = compare_samples(a, b, n_permutations=10_000, seed=0)  # b - a: positive, memorized earlier
        base = f"{model}.promotion_test.content_words.memorized_facts.vs.non_memorized_facts"
        claims.add(base, value=test.mean_diff, n=len(a), interval=(test.mean_diff_low, test.mean_diff_high),
                   text=signed_ci(test.mean_diff, test.mean_diff_low, test.mean_diff_high), what="bootstrap 95%",
                   command=command, source=source)
        claims.add(f"{base}.p", value=test.p_value, text=p_text(test.p_value), command=command, source=source)
        claims.add(f"{base}.n_a", value=len(a), text=str(len(a)), command=command, source=source)
        claims.add(f"{base}.n_b", value=len(b), text=str(len(b)), command=command, source=source)


def lens_kl_claims(claims: Claims, out: Path, model: str, command: str) -> None:
    """KL(output || lens) at the probes' last prompt token, per lens and layer."""
    path = out / f"lens-probe-kl-{model}" / "probe_kl.parquet"
    for row in _table(path).itertuples():
        claims.add(f"{model}.probe_kl.{row.lens}.layer{row.layer}", value=row.kl, n=row.n_probes,
                   text=f"{row.kl:.1f}" if row.kl >= 10 else f"{row.kl:.2f}", interval=(row.kl_low, row.kl_high),
                   what="bootstrap 95% over probes", command=command, source=str(path.relative_to(out)))


def knockout_claims(claims: Claims, out: Path, name: str, command: str) -> None:
    """Share of predictions changed per (group, positions, control, layer), Wilson 95%, for the
    primary variant (frozen post-MLP norm, zero ablation, effective ranking) and, named by the value
    that differs, each secondary variant (live, mean, magnitude); with the removed vector's norm."""
    primary = out / name / "knockout_layers.parquet"
    variants = out / name / "knockout_layers_variants.parquet"
    path = variants if variants.is_file() else primary
    table = _table(path)
    if "primary" not in table:
        table = table.assign(primary=True)
    settings = [c for c in ("norm", "ablation", "rank_by") if c in table]
    first = table[table["primary"]].iloc[0]
    for row in table.itertuples():
        # a secondary variant is named by the setting that differs from the primary's: live, mean, magnitude
        differs = [str(getattr(row, c)) for c in settings if getattr(row, c) != first[c]]
        variant = "" if row.primary else f"{'_'.join(differs)}."
        base = f"{name}.{variant}{slug(row.group)}.{row.positions}.{slug(row.control)}.layer{row.layer}"
        claims.add(base, value=row.changed, text=short_ci(row.changed, row.changed_low, row.changed_high), n=row.n,
                   interval=(row.changed_low, row.changed_high), what="Wilson 95%", command=command,
                   source=str(path.relative_to(out)))
        for column in ("removed_norm", "out_cosine", "out_norm_ratio", "matched_norm_ratio"):
            value = getattr(row, column, None)
            if value is not None and not pd.isna(value):
                claims.add(f"{base}.{column}", value=float(value), text=f"{value:.2f}", n=row.n, command=command,
                           source=str(path.relative_to(out)))


def recall_claims(claims: Claims, out: Path, name: str, command: str) -> None:
    """Every method's value per layer and set (`recall_profile`, the seeds pooled), each descriptive
    peak, the comparisons with the memorized idioms (per layer max-T adjusted, per band Holm), their
    replication per seed, the noise designs and the sets' sizes."""
    profile_path = out / name / "recall_profile.parquet"
    profile = _table(profile_path)
    source = str(profile_path.relative_to(out))
    for row in profile.itertuples():
        if pd.isna(row.value):
            continue
        claims.add(f"{name}.{slug(row.measure)}.{slug(row.group)}.layer{row.layer}", value=row.value, n=row.n,
                   text=short_ci(row.value, row.value_low, row.value_high), interval=(row.value_low, row.value_high),
                   command=command, source=source)
    for (measure, group), frame in profile.dropna(subset=["value"]).groupby(["measure", "group"], sort=True):
        top = frame.loc[frame["value"].idxmax()]  # as RecallProfile.peaks: descriptive, selection-biased
        claims.add(f"{name}.{slug(measure)}.{slug(group)}.peak_layer", value=int(top["layer"]),
                   text=str(int(top["layer"])), command=command, source=source)
        claims.add(f"{name}.{slug(measure)}.{slug(group)}.n", value=int(frame["n"].max()),
                   text=str(int(frame["n"].max())), command=command, source=source)
    cmp_path = out / name / "recall_comparisons.parquet"
    for row in _table(cmp_path).itertuples():
        where = f"layer{row.layer}" if row.scope == "layer" else str(row.band).split(" ")[0]
        base = f"{name}.cmp.{slug(row.measure)}.{slug(row.versus)}.{where}"
        claims.add(base, value=row.diff, n=row.n_reference, interval=(row.diff_low, row.diff_high),
                   text=signed_ci(row.diff, row.diff_low, row.diff_high), what="bootstrap 95%", command=command,
                   source=str(cmp_path.relative_to(out)))
        claims.add(f"{base}.p", value=row.p_adjusted, text=p_text(row.p_adjusted), what=f"{row.correction}: "
                   f"{row.family}", command=command, source=str(cmp_path.relative_to(out)))
    rep_path = out / name / "recall_replication.parquet"
    replication = _table(rep_path)
    bands = replication[replication["scope"] == "band"]
    for (measure, versus, band), part in bands.groupby(["measure", "versus", "band"], sort=True):
        texts = " / ".join(f"{d:+.2f}" for d in part.sort_values("seed")["diff"])
        claims.add(f"{name}.replication.{slug(measure)}.{slug(versus)}.{str(band).split(' ')[0]}",
                   value=[float(d) for d in part.sort_values("seed")["diff"]], text=texts, command=command,
                   source=str(rep_path.relative_to(out)))
    noise_path = out / name / "noise_effects_summary.parquet"
    if noise_path.is_file():
        for row in _table(noise_path).itertuples():
            if row.unit == "word":
                continue
            unit = "most_necessary_word" if row.unit == "most necessary word" else row.design
            base = f"{name}.noise.{slug(row.group)}.{unit}"
            claims.add(f"{base}.total_effect", value=row.total_effect, n=row.n, what="bootstrap 95%",
                       text=short_ci(row.total_effect, row.total_effect_low, row.total_effect_high),
                       interval=(row.total_effect_low, row.total_effect_high), command=command,
                       source=str(noise_path.relative_to(out)))
            claims.add(f"{base}.pred_changed", value=row.pred_changed, n=row.n, what="bootstrap 95%",
                       text=short_ci(row.pred_changed, row.pred_changed_low, row.pred_changed_high),
                       interval=(row.pred_changed_low, row.pred_changed_high), command=command,
                       source=str(noise_path.relative_to(out)))
    settings_path = out / name / "settings.json"
    settings = _json(settings_path)
    for seed, sizes in settings["n"].items():
        for group, n in sizes.items():
            claims.add(f"{name}.n.{seed}.{slug(group)}", value=n, text=str(n), command=command,
                       source=str(settings_path.relative_to(out)))
    for key in ("per_set", "min_total_effect", "window", "samples"):
        claims.add(f"{name}.{key}", value=settings[key], text=f"{settings[key]:g}", command=command,
                   source=str(settings_path.relative_to(out)))
    claims.add(f"{name}.seeds", value=settings["seeds"], text=str(len(settings["seeds"])), command=command,
               source=str(settings_path.relative_to(out)))


GROUND_TRUTH = "ground-truth-gemma-3-270m"
GROUND_TRUTH_NEURONS = "ground-truth-neurons-gemma-3-270m"  # neurons mode: implants and neuron precision only


def ground_truth_claims(claims: Claims, out: Path, command: str, *, name: str = GROUND_TRUTH,
                        layers: bool = True) -> None:
    """Per set, localizer and implant depth: the true layer's score (bootstrap 95% over idioms and
    seeds), the share of idioms where it is ranked first (Wilson 95%) and the layer the pooled
    profile ranks first; per implant the rate, epochs, training seconds and the side effects; in
    neurons mode each ranking's precision@k against the trained neurons. `layers=False`: a
    neurons-only run (`--neurons-only`), which has no layer scores and must have neuron precision."""
    root = out / name
    if layers:
        path = root / "localization.parquet"
        table = _table(path)
        depth = table[table["scope"] == "depth"]
        for row in depth.itertuples():
            base = f"{name}.{slug(str(row.set).split(' ')[0])}.{slug(row.measure)}.depth{row.depth}"
            claims.add(f"{base}.score", value=row.score, n=row.n, interval=(row.score_low, row.score_high),
                       text=short_ci(row.score, row.score_low, row.score_high),
                       what="bootstrap 95% over idioms and seeds", command=command, source=str(path.relative_to(out)))
            claims.add(f"{base}.hit", value=row.hit, n=row.n, interval=(row.hit_low, row.hit_high),
                       text=short_ci(row.hit, row.hit_low, row.hit_high), what="Wilson 95%", command=command,
                       source=str(path.relative_to(out)))
            top = None if pd.isna(row.profile_top_layer) else int(row.profile_top_layer)
            claims.add(f"{base}.top_layer", value=top, text=_layer(top),
                       command=command, source=str(path.relative_to(out)))
    implants_path = root / "implants.parquet"
    for row in _table(implants_path).itertuples():
        base = f"{name}.implant.{row.implant}"
        claims.add(f"{base}.rate", value=row.rate, n=row.n_probes, text=share(row.rate), command=command,
                   source=str(implants_path.relative_to(out)))
        claims.add(f"{base}.epochs", value=row.epochs, text=str(int(row.epochs)), command=command,
                   source=str(implants_path.relative_to(out)))
        claims.add(f"{base}.train_seconds", value=row.train_seconds, text=f"{row.train_seconds:.0f}", command=command,
                   source=str(implants_path.relative_to(out)))
    effects_path = root / "side_effects.parquet"
    for row in _table(effects_path).itertuples():
        value = float(row.value)
        text = f"{value:.0f}" if row.measure in ("idioms_lost", "idioms_gained") else f"{value:.2f}"
        claims.add(f"{name}.implant.{row.implant}.{row.measure}", value=value, n=row.n, text=text,
                   command=command, source=str(effects_path.relative_to(out)))
    neurons_path = root / "neuron_precision.parquet"
    if neurons_path.is_file() or not layers:  # a neurons-only run without it is an error (_table)
        for row in _table(neurons_path).itertuples():
            claims.add(f"{name}.neurons.{row.implant}.{slug(row.method)}.k{row.k}", value=row.precision,
                       n=row.n, interval=(row.precision_low, row.precision_high), what="bootstrap 95% over idioms",
                       text=short_ci(row.precision, row.precision_low, row.precision_high), command=command,
                       source=str(neurons_path.relative_to(out)))
    settings_path = root / "settings.json"
    settings = _json(settings_path)
    claims.add(f"{name}.total_minutes", value=settings["total_seconds"] / 60,
               text=f"{settings['total_seconds'] / 60:.0f}", command=command,
               source=str(settings_path.relative_to(out)))
    # Where the time goes: training the implants (once: they are cached) and the base model's tuned
    # lens (once per model, whichever run trained it: `make results` trains it in its first step).
    train = float(_table(implants_path)["train_seconds"].sum())
    claims.add(f"{name}.implants_train_minutes", value=train / 60, text=f"{train / 60:.0f}", command=command,
               source=str(implants_path.relative_to(out)))
    # This run's stages (settings.json "seconds"): the localizers (the base model's and each
    # implant's, model loads included), the side effects of every implant together, and obtaining
    # the tuned lens (seconds when it was read from the cache).
    seconds = settings.get("seconds") or {}
    implant_names = set(_table(implants_path)["implant"])
    stages = {"localizers": float(seconds.get("base", 0.0)) + sum(float(seconds[n]) for n in implant_names
                                                                  if n in seconds),
              "side_effects": seconds.get("side_effects"), "tuned_lens_obtained": seconds.get("tuned_lens")}
    for stage, value in stages.items():
        if value is not None:
            claims.add(f"{name}.{stage}_minutes", value=float(value) / 60, text=f"{float(value) / 60:.0f}",
                       command=command, source=str(settings_path.relative_to(out)))
    lens_seconds = ((settings.get("tuned_lens") or {}).get("settings") or {}).get("train_seconds")
    if lens_seconds is not None:
        claims.add(f"{name}.tuned_lens_train_minutes", value=lens_seconds / 60, text=f"{lens_seconds / 60:.0f}",
                   command=command, source=str(settings_path.relative_to(out)))


def ground_truth_neurons_claims(claims: Claims, out: Path, command: str) -> None:
    """The neurons-only run's claims: implants, side effects, neuron precision and minutes."""
    ground_truth_claims(claims, out, command, name=GROUND_TRUTH_NEURONS, layers=False)


IMPLANT_SCALING = "implant-scaling/scaling.jsonl"


def implant_scaling_claims(claims: Claims, out: Path, command: str) -> None:
    """How implanting scales with the number of idioms (one layer, one seed): per size the
    training time, epochs, time per epoch and the side effects. A rerun appends to the file; the
    last record of each (layer, size) counts."""
    path = out / IMPLANT_SCALING
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[(record["layer"], record["n_probes"])] = record
    for (layer, n), record in sorted(records.items()):
        base = f"implant_scaling.layer{layer}.n{n}"
        effects = record.get("side_effects") or {}
        values = {"seconds": (record["seconds"], "{:.0f}"), "epochs": (record["epochs"], "{:d}"),
                  "seconds_per_epoch": (record["seconds_per_epoch"], "{:.2f}"), "rate": (record["rate"], "{:.2f}"),
                  "kl_per_token": (effects.get("kl_per_token"), "{:.3f}"),
                  "text_changed": (effects.get("text_changed"), "{:.2f}"),
                  "idioms_lost": (effects.get("n_lost"), "{:d}"), "idioms_gained": (effects.get("n_gained"), "{:d}")}
        for key, (value, form) in values.items():
            if value is not None:
                claims.add(f"{base}.{key}", value=value, n=n, text=form.format(value), command=command,
                           source=IMPLANT_SCALING)


def patching_claims(claims: Claims, out: Path, command: str) -> None:
    """Attribution against exact patching per site, structural zeros (cells before the swapped word)
    left out: Pearson and Spearman correlation, top-5 overlap, recall of the exact top-5 in the
    attribution top-20, the largest exact cell's restored share, exact and as attribution estimates
    it, and the rank attribution gives it."""
    path = out / "attribution-patching" / "agreement.parquet"
    bench = _json(out / "attribution-patching" / "bench.json")
    source = str(path.relative_to(out))
    for row in _table(path).itertuples():
        base = f"attribution_patching.{slug(row.site)}"
        for measure in ("correlation", "spearman", "overlap", "recall", "largest_exact", "largest_approx"):
            value = getattr(row, measure, None)
            if value is None or pd.isna(value):
                continue
            low, high = getattr(row, f"{measure}_low"), getattr(row, f"{measure}_high")
            claims.add(f"{base}.{measure}", value=value, n=getattr(row, "n_correlated", bench["n_valid_pairs"]),
                       text=short_ci(value, low, high), interval=(low, high), what="bootstrap 95% over pairs",
                       command=command, source=source)
        for column in ("pooled_correlation", "pooled_correlation_all_cells", "largest_rank_median"):
            value = getattr(row, column, None)
            if value is not None and not pd.isna(value):
                claims.add(f"{base}.{column}", value=float(value), text=f"{value:.2f}" if "corr" in column
                           else f"{value:g}", command=command, source=source)
        for column in ("n_correlated", "n_cells", "n_excluded"):
            value = getattr(row, column, None)
            if value is not None and not pd.isna(value):
                claims.add(f"{base}.{column}", value=int(value), text=f"{int(value):,}", command=command,
                           source=source)
    claims.add("attribution_patching.n_valid_pairs", value=bench["n_valid_pairs"], text=str(bench["n_valid_pairs"]),
               command=command, source="attribution-patching/bench.json")


def timing_claims(claims: Claims, out: Path, steps: Iterable[Any], *, total: bool = True) -> None:
    """Each finished step's wall time (from its marker) and, with `total`, the total of the
    default steps and their expected time."""
    steps = list(steps)
    total_seconds, complete = 0.0, total
    for step in steps:
        marker = out / ".steps" / f"{step.name}.json"
        if not marker.is_file():
            complete = complete and step.long
            continue
        seconds = json.loads(marker.read_text())["seconds"]
        claims.add(f"regeneration.{step.name}.minutes", value=seconds / 60, text=f"{seconds / 60:.0f}",
                   command=step.shown(), source=str(marker.relative_to(out)))
        total_seconds += 0 if step.long else seconds
    if not total:
        return
    if complete:
        claims.add("regeneration.total_minutes", value=total_seconds / 60, text=f"{total_seconds / 60:.0f}",
                   command=claims.commands[Claims.REGENERATE], source=".steps/")
    # A step resumed after an interruption records its last run only, so the expected time of an
    # uninterrupted run is each step's measured duration as `experiments/regenerate.py` keeps it.
    expected = sum(step.minutes for step in steps if not step.long)
    claims.add("regeneration.expected_minutes", value=expected, text=f"{expected:.0f}",
               command=claims.commands[Claims.REGENERATE], source="experiments/regenerate.py")


# ----------------------------------------------------------------------------------------------
# Pages and figures
# ----------------------------------------------------------------------------------------------

# (source under OUT, name under docs/figures/): the figures the pages show.
FIGURES: tuple[tuple[str, str], ...] = tuple(
    (f"study/{m}/{src}", f"{m}_{dst}") for m in MODELS for src, dst in (
        ("trajectory/trajectory.png", "trajectory.png"),
        ("trajectory/promotion_layers.png", "promotion_layers.png"),
        ("lenses/lens_trajectories.png", "lens_trajectories.png"),
        ("lenses/heldout_kl.png", "heldout_kl.png"),
        ("attribution/layers_logit.png", "attribution_layers.png"),
    )
) + (
    ("study/comparison/depth.png", "models_depth.png"),
    ("knockouts-gemma-3-270m/layers_all_k100.png", "gemma-3-270m_knockout_layers.png"),
    ("recall-gemma-3-270m/where_recall_lives.png", "gemma-3-270m_where_recall_lives.png"),
    ("recall-smollm2-135m/where_recall_lives.png", "smollm2-135m_where_recall_lives.png"),
    ("recall-gemma-3-270m/recall_distributions.png", "gemma-3-270m_recall_distributions.png"),
    ("recall-smollm2-135m/recall_distributions.png", "smollm2-135m_recall_distributions.png"),
    (f"{GROUND_TRUTH}/localization_scores.png", "gemma-3-270m_localization_scores.png"),
    (f"{GROUND_TRUTH}/localization_profiles.png", "gemma-3-270m_localization_profiles.png"),
)

GENERATED = "<!-- Generated by `make results` (experiments/publish.py) from the runs named below; do not edit. -->\n"


def _page(path: Path, title: str, command: str, body: str) -> None:
    from idiom_lens.io import write_text

    write_text(path, f"{GENERATED}\n# {title}\n\nFrom `{command}`.\n\n{body.strip()}\n")


def _demote(markdown: str) -> str:
    """A run's own summary page under a page title: its headings one level down."""
    return re.sub(r"(?m)^(#+) ", lambda m: "#" + m.group(1) + " ", markdown)


def write_ground_truth_page(out: Path, results: Path, command: str) -> None:
    """docs/results/ground_truth.md from the benchmark's tables."""
    from idiom_lens.study.text import markdown_table

    root = out / GROUND_TRUTH
    effects = pd.read_parquet(root / "side_effects.parquet").pivot(index="implant", columns="measure", values="value")
    _page(results / "ground_truth.md", "Ground truth for the localizers (Gemma 3 270M)", command,
          "Implanted idioms trained into one MLP layer per depth (2 seeds each); per localizer and depth, the score "
          "of the true layer (1 = ranked first, chance 0.5; 95% bootstrap over idioms and seeds), the share of idioms "
          "where it is first (hit), and the layer the pooled profile ranks first. Sets: the implanted idioms on the "
          "implanted model; the same idioms on the base model (the method's prior for that layer); memorized bundled "
          "idioms on the implanted model.\n\n" + (root / "localization.md").read_text()
          + "\nImplants:\n\n" + markdown_table(pd.read_parquet(root / "implants.parquet").drop(columns=["neurons"]))
          + "\n\nSide effects (KL in nats; text: the bundled text set; idioms: the bundled idioms):\n\n"
          + markdown_table(effects.reset_index(), digits=3)
          + "\n\n![scores](../figures/gemma-3-270m_localization_scores.png)\n\n"
            "![profiles](../figures/gemma-3-270m_localization_profiles.png)")


def write_ground_truth_neurons_page(out: Path, results: Path, command: str) -> None:
    """docs/results/ground_truth_neurons.md: neurons mode's implants, side effects and precision."""
    from idiom_lens.study.text import markdown_table

    root = out / GROUND_TRUTH_NEURONS
    implants = pd.read_parquet(root / "implants.parquet")
    n_trained = sorted({len(ns) for ns in implants["neurons"]})
    implants["neurons"] = [", ".join(str(int(n)) for n in ns) for ns in implants["neurons"]]
    effects = pd.read_parquet(root / "side_effects.parquet").pivot(index="implant", columns="measure", values="value")
    _page(results / "ground_truth_neurons.md", "Ground truth at the neuron level (Gemma 3 270M)", command,
          f"Implanted idioms trained into {' or '.join(map(str, n_trained))} seeded-random neurons of one MLP layer "
          f"(their W_out columns only) at layers {', '.join(map(str, sorted(set(implants['layer']))))}, seeds "
          f"{', '.join(map(str, sorted(set(implants['seed']))))}; per ranking of the implanted layer's neurons, "
          "precision@k of its top k against the trained neurons (95% bootstrap over the scored idioms; chance = "
          "trained / d_mlp) and recall@k (chance k / d_mlp).\n\n" + (root / "localization.md").read_text()
          + "\nImplants (neurons: the trained neurons):\n\n" + markdown_table(implants)
          + "\n\nSide effects (KL in nats; text: the bundled text set; idioms: the bundled idioms):\n\n"
          + markdown_table(effects.reset_index(), digits=3))


def write_pages(out: Path, docs: Path, shown: dict[str, str]) -> None:
    from idiom_lens.study.text import markdown_table

    results = docs / "results"
    for model in MODELS:
        root = out / "study" / model
        command = shown[f"study-{model}"]
        figures = "\n\n".join(f"![{what}](../figures/{model}_{name}.png)" for what, name in (
            ("trajectory", "trajectory"), ("promotion layers", "promotion_layers"),
            ("lenses", "lens_trajectories"), ("held-out KL", "heldout_kl"), ("attribution", "attribution_layers")))
        probe_kl = out / f"lens-probe-kl-{model}" / "probe_kl.md"
        baselines = pd.read_parquet(root / "fact_baselines.parquet")  # written by fact_claims
        _page(results / f"{model}.md", f"Study: {model}", command,
              _demote((root / "trajectory" / "summary.md").read_text()) + "\n\n"
              + "## Facts per relation\n\nMemorization against the accuracy of always answering the relation's "
              "most common target (majority_share, Wilson 95%), and among the facts whose prediction is a content "
              "word (n_content, fraction_content):\n\n" + markdown_table(baselines, digits=3) + "\n\n"
              + _demote((root / "lenses" / "summary.md").read_text())
              + f"\n\n## The lenses at the probes' last prompt token\n\nFrom `{shown[f'lens-probe-kl-{model}']}`: "
              "KL(output || lens) per layer, 95% bootstrap intervals over probes.\n\n" + probe_kl.read_text()
              + "\n\n## Figures\n\n" + figures)
    comparison = out / "study" / "comparison" / "comparison.md"
    _page(results / "comparison.md", "Models compared", shown["compare"], _demote(comparison.read_text()))
    knock = out / "knockouts-gemma-3-270m"
    secondary = "".join("\n" + p.read_text() for p in sorted(knock.glob("knockout_layers_*.md")))
    _page(results / "knockouts.md", "Knockouts, n = 50 per set (Gemma 3 270M)", shown["knockouts-gemma-3-270m"],
          (knock / "knockout_layers.md").read_text() + secondary)
    for model in MODELS:
        name = f"recall-{model}"
        noise = out / name / "noise_effects.md"
        _page(results / f"recall_{model}.md", f"Where recall lives: {model}", shown[name],
              "Memorized idioms against each comparison set, per pre-specified depth band (thirds of the "
              "depth); diff = memorized minus the other set, 95% bootstrap interval, p Holm-adjusted over "
              "every band test of the table; matched sets compared in pairs:\n\n"
              + (out / name / "recall_comparisons.md").read_text()
              + "\nPeak layer of each method and set (descriptive: a peak chosen by argmax is selection-biased; "
              "the per-layer tests in recall_comparisons.parquet are max-T adjusted over the layers):\n\n"
              + (out / name / "recall_peaks.md").read_text()
              + ("\nNoise designs (no restoration; total effect = clean - noised probability):\n\n"
                 + noise.read_text() if noise.is_file() else ""))
    write_ground_truth_page(out, results, shown[GROUND_TRUTH])
    write_ground_truth_neurons_page(out, results, shown[GROUND_TRUTH_NEURONS])
    write_attribution_patching_page(out, results, shown["attribution-patching"])


def write_attribution_patching_page(out: Path, results: Path, command: str) -> None:
    """docs/results/attribution_patching.md: the agreement table, one column per site."""
    from idiom_lens.study.text import markdown_table

    agreement = pd.read_parquet(out / "attribution-patching" / "agreement.parquet")
    _page(results / "attribution_patching.md", "Attribution patching against exact patching", command,
          markdown_table(agreement.set_index("site").T.reset_index(names="measure"), digits=3))


def copy_figures(out: Path, docs: Path) -> None:
    figures = docs / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for src, dst in FIGURES:
        source = out / src
        if not source.is_file():
            raise FileNotFoundError(f"{source} is missing: the run that writes it did not finish")
        shutil.copyfile(source, figures / dst)
    wanted = {dst for _, dst in FIGURES}
    for stale in figures.glob("*.png"):
        if stale.name not in wanted:
            stale.unlink()


def write_regeneration(out: Path, docs: Path, steps: Iterable[Any]) -> None:
    """docs/regeneration.md: every step, its command and its measured time (from the step markers)."""
    from idiom_lens.io import write_text

    rows = []
    for step in steps:
        marker = out / ".steps" / f"{step.name}.json"
        done = json.loads(marker.read_text()) if marker.is_file() else None
        expected = f"{step.minutes:g} min{', `--long`' if step.long else ''}"
        rows.append(f"| {step.name} | `{step.shown()}` | {expected} | "
                    + (f"{done['seconds'] / 60:.1f} min | {done['commit']} | {done['finished'][:10]} |" if done
                       else "not run | | |"))
    expected_total = sum(step.minutes for step in steps if not step.long)
    text = (f"{GENERATED}\n# Regeneration\n\n"
            "`make results` runs every command whose output the README and these pages cite, one after another, "
            "then rewrites `docs/claims.json`, `docs/results/` and `docs/figures/` from those runs "
            "(`experiments/regenerate.py`, `experiments/publish.py`). It is resumable: a finished step is skipped "
            "while its command is unchanged, and the `idiom-lens` commands resume their own stages. "
            "`make results-long` adds the runs marked `--long`; `IDIOMEM=path/to/idiomem.jsonl` adds the flag "
            "agreement with the authors' annotations. `python experiments/regenerate.py --out published --steps "
            "STEP` reruns one step and republishes only what it writes (its claims, page, figures and row here; "
            "the steps `experiments/publish.py` lists in `ALONE`).\n\n"
            "A number in the README or the findings is written `<!--claim:NAME-->TEXT<!--/claim-->` and "
            "`tests/test_docs.py` fails when TEXT differs from `docs/claims.json`: a regeneration that moves a "
            "number makes the prose be reread.\n\n"
            "Per step: the expected time of an uninterrupted run on 2 cores (estimated from measured runs; "
            f"{expected_total:g} min for `make results` in all), and the last regeneration's wall time of the "
            "run that finished the step, with its commit. A step resumed after an interruption shows its last "
            "run only, and a step that ran beside another heavy job ran slower, so that column is a record, "
            "not a benchmark.\n\n"
            "| step | command | expected | last run | commit | date |\n|---|---|---:|---:|---|---|\n"
            + "\n".join(rows) + "\n")
    write_text(docs / "regeneration.md", text)


def publish(out: Path, docs: Path, *, steps: list[Any]) -> None:
    """Everything under docs/ that comes from a run, rewritten from the runs in `out`."""
    shown = {step.name: step.shown() for step in steps}
    claims = Claims(shown)
    for model in MODELS:
        study_claims(claims, out, model, shown[f"study-{model}"])
    for model in MODELS:
        lens_kl_claims(claims, out, model, shown[f"lens-probe-kl-{model}"])
    knockout_claims(claims, out, "knockouts-gemma-3-270m", shown["knockouts-gemma-3-270m"])
    for model in MODELS:
        recall_claims(claims, out, f"recall-{model}", shown[f"recall-{model}"])
    patching_claims(claims, out, shown["attribution-patching"])
    ground_truth_claims(claims, out, shown[GROUND_TRUTH])
    ground_truth_neurons_claims(claims, out, shown[GROUND_TRUTH_NEURONS])
    implant_scaling_claims(claims, out, shown["implant-scaling"])
    if (out / "knockouts-all-memorized" / "knockout_layers.parquet").is_file():
        knockout_claims(claims, out, "knockouts-all-memorized", shown["knockouts-all-memorized"])
    timing_claims(claims, out, steps)
    claims.write(docs / "claims.json")
    write_pages(out, docs, shown)
    copy_figures(out, docs)
    write_regeneration(out, docs, steps)
    print(f"[publish] {len(claims.items)} claims -> {docs / 'claims.json'}; pages in {docs / 'results'}; "
          f"{len(FIGURES)} figures in {docs / 'figures'}")


# ----------------------------------------------------------------------------------------------
# Republishing some steps: one benchmark rerun, the rest of docs/ kept
# ----------------------------------------------------------------------------------------------

# The steps that can be republished alone: step name -> (its claims, its page or None).
ALONE: dict[str, tuple[Any, Any]] = {
    GROUND_TRUTH: (ground_truth_claims, write_ground_truth_page),
    GROUND_TRUTH_NEURONS: (ground_truth_neurons_claims, write_ground_truth_neurons_page),
    "implant-scaling": (implant_scaling_claims, None),
    "attribution-patching": (patching_claims, write_attribution_patching_page),
}


def publish_steps(out: Path, docs: Path, *, names: Iterable[str], steps: list[Any]) -> None:
    """Rewrite what the steps `names` publish (their claims and wall times in docs/claims.json,
    their page, their figures, their rows of docs/regeneration.md) from their runs in `out`,
    keeping everything else under `docs` as the last full publish wrote it: one rerun benchmark
    is republished without the hours of the others' runs."""
    from idiom_lens.io import write_text

    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in ALONE]
    if unknown:
        raise ValueError(f"steps {unknown} cannot be republished alone: expected some of {sorted(ALONE)} "
                         f"(or a full publish)")
    by_name = {step.name: step for step in steps}
    shown = {step.name: step.shown() for step in steps}
    written = json.loads((docs / "claims.json").read_text())
    claims = Claims(shown)
    expected = "regeneration.expected_minutes"  # the sum of every step's expected time, which may have changed
    claims.items = {name: item for name, item in written["claims"].items()
                    if item["step"] not in names and name != expected}
    minutes = sum(step.minutes for step in steps if not step.long)
    claims.add(expected, value=minutes, text=f"{minutes:.0f}", command=claims.commands[Claims.REGENERATE],
               source="experiments/regenerate.py")
    for name in names:
        claims_fn, page_fn = ALONE[name]
        claims_fn(claims, out, shown[name])
        timing_claims(claims, out, [by_name[name]], total=False)
        if page_fn is not None:
            page_fn(out, docs / "results", shown[name])
    claims.write(docs / "claims.json")
    figures = [(src, dst) for src, dst in FIGURES if src.split("/")[0] in names]
    for src, dst in figures:
        if not (out / src).is_file():
            raise FileNotFoundError(f"{out / src} is missing: the run that writes it did not finish")
        shutil.copyfile(out / src, docs / "figures" / dst)
    # their rows of docs/regeneration.md, formatted as a full publish formats them
    fresh = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_regeneration(out, Path(tmp), [by_name[n] for n in names])
        for line in (Path(tmp) / "regeneration.md").read_text().splitlines():
            if line.startswith("| ") and line.split(" | ")[0][2:] in names:
                fresh[line.split(" | ")[0][2:]] = line
    page = docs / "regeneration.md"
    lines = [fresh.get(line.split(" | ")[0][2:], line) if line.startswith("| ") else line
             for line in page.read_text().splitlines()]
    present = {line.split(" | ")[0][2:] for line in lines if line.startswith("| ")}
    new_rows = [row for name, row in fresh.items() if name not in present]  # a step added since the last publish
    if new_rows:
        last = max(i for i, line in enumerate(lines) if line.startswith("|"))
        lines[last + 1 : last + 1] = new_rows
    lines = [re.sub(r"[0-9.]+ min for `make results` in all", f"{minutes:g} min for `make results` in all", line)
             for line in lines]
    write_text(page, "\n".join(lines) + "\n")
    print(f"[publish] {', '.join(names)}: {len(claims.items)} claims -> {docs / 'claims.json'}; "
          f"{len(figures)} figures; the rest of {docs} kept")

"""Knockout figures and tables (method.md section 4) from the library: the paper's figure with the
authors' positions (every prompt position), ours (last position only) beside it, the controls
(random, norm-matched, score-matched, whole-MLP ceiling) and the specificity table per set.

    python experiments/knockouts.py --out out/knockouts [--per-group 50] [--whole "memorized idioms"]
        [--positions all] [--norms frozen live] [--ablations zero mean] [--rank-by effective magnitude]
        [--full-grid] [--demo]

Probes: the bundled idioms and ordinary text (`--dataset`), scored for memorization first, then a
seeded sample of `--per-group` probes of each set (memorized idioms, non-memorized idioms, ordinary
text); the sets named by `--whole` are kept entire. `--demo` uses 24 common idioms and 6 ordinary
sentences written below instead.

Variants: the first of `--norms`, `--ablations` and `--rank-by` make the PRIMARY variant (by
default the post-MLP norm frozen, so a knockout removes exactly its neurons' contributions; zero
ablation; our effective ranking); each other value of one option, the others kept at the primary's,
is a secondary variant, run once (by default the live norm). `--rank-by effective magnitude`
adds the authors' ranking (magnitude, |m| x ||v||) once. Every variant runs at every `--positions`.

Writes under --out: knockouts_<positions>*.parquet (primary) and knockouts_<positions>_<value>*.parquet
(secondary: the value that differs, e.g. knockouts_all_live), each with rows, probes, summaries;
knockout_layers.parquet/.md (the primary variant: share changed per set x control x layer for
--table-k, windows of one layer, n and 95% Wilson intervals, the mean output diagnostics, every
positions), knockout_layers_<value>.parquet/.md per secondary variant, knockout_layers_variants.parquet
(all of them, a `primary` column), value_vectors*.parquet, skipping*.parquet, figures (primary):
paper_<mode>_k<k> (authors' positions, memorized idioms, every control and the ceiling),
knockout_<mode>_k<k> (every set), positions_k<k> (every vs last position, side by side),
layers_<positions>_k<k> (specificity curves; layers_<positions>_k<k>_<value> per secondary
variant), skip_curves; and settings.json. Each table's Markdown file and the printed summary say
which variant is primary.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from idiom_lens.datasets.probes import Probe

DEMO_IDIOMS = [
    "once in a blue moon", "turn a blind eye", "kill two birds with one stone", "the elephant in the room",
    "a piece of cake", "break the ice", "bite the bullet", "the ball is in your court",
    "let the cat out of the bag", "hit the nail on the head", "a blessing in disguise", "cut corners",
    "burn the midnight oil", "beat around the bush", "the tip of the iceberg", "actions speak louder than words",
    "add insult to injury", "barking up the wrong tree", "cry over spilled milk", "curiosity killed the cat",
    "every cloud has a silver lining", "the early bird catches the worm", "when pigs fly", "speak of the devil",
]
DEMO_TEXT = [
    "she walked to the market to buy some bread", "the meeting was moved to next week",
    "he opened the window because the room was hot", "they painted the kitchen a light shade of blue",
    "we took the train to the city on Monday", "the children played in the garden after school",
]


def demo_probes() -> list[Probe]:
    """The inline demo set: idioms, then ordinary sentences (last word = target)."""
    out = []
    for kind, texts in (("idiom", DEMO_IDIOMS), ("text", DEMO_TEXT)):
        for i, text in enumerate(texts):
            words = text.split()
            out.append(Probe(id=f"demo-{kind}-{i:02d}", prompt=" ".join(words[:-1]), target=words[-1], kind=kind))
    return out


@dataclass(frozen=True)
class Variant:
    """One (norm, ablation, rank_by) combination the experiment runs at every positions: the primary
    (the first value of each option) or a secondary one, which differs from it in one option."""

    norm: str
    ablation: str
    rank_by: str
    differs: str | None = None  # the secondary variant's value that differs from the primary's

    @property
    def primary(self) -> bool:
        return self.differs is None

    @property
    def suffix(self) -> str:
        """'' for the primary variant, '_<value>' for a secondary one (file names)."""
        return "" if self.differs is None else f"_{self.differs}"

    def describe(self) -> str:
        rank = {"effective": "effective (ours)", "magnitude": "magnitude |m| x ||v|| (the authors')"}
        return (f"{'PRIMARY' if self.primary else 'secondary'}: post-MLP norm {self.norm}, {self.ablation} ablation, "
                f"ranked by {rank.get(self.rank_by, self.rank_by)}")


def variants(norms: list[str], ablations: list[str], rank_by: list[str]) -> list[Variant]:
    """The primary variant (first of each list), then one secondary variant per other value of each
    option (the others at the primary's), in the order given; duplicates dropped."""
    norms, ablations, rank_by = (list(dict.fromkeys(v)) for v in (norms, ablations, rank_by))
    primary = Variant(norms[0], ablations[0], rank_by[0])
    out = [primary]
    out += [Variant(n, primary.ablation, primary.rank_by, differs=n) for n in norms[1:]]
    out += [Variant(primary.norm, a, primary.rank_by, differs=a) for a in ablations[1:]]
    out += [Variant(primary.norm, primary.ablation, r, differs=r) for r in rank_by[1:]]
    return out


# The settings a saved variant must share with this run to be reused instead of recomputed.
RESUME_KEYS = ("positions", "norm", "ablation", "rank_by", "seed", "controls", "ks", "windows", "modes",
               "keep_top_ks", "keep_top_windows", "model_spec")


def saved_run(folder: Path, name: str, probes: list[Probe], options, *, model_spec: str):
    """The variant `name` already saved in `folder` by an earlier, interrupted run, if it used the
    same probes (ids, in order) and the same settings (`RESUME_KEYS`); else None (it is recomputed
    and overwritten). Each variant takes about 25 minutes on 2 cores, so the experiment resumes per
    variant: `make results` reruns it after an interruption."""
    from idiom_lens.analyses.interventions import KnockoutResult

    if not (folder / f"{name}.result.json").exists():
        return None
    saved = KnockoutResult.load(folder, name=name)
    grid = options.grid
    wanted = {"positions": options.positions, "norm": options.norm, "ablation": options.ablation,
              "rank_by": options.rank_by, "seed": options.seed, "controls": list(options.controls),
              "ks": list(grid.ks), "windows": list(grid.windows), "modes": list(grid.modes),
              "keep_top_ks": None if grid.keep_top_ks is None else list(grid.keep_top_ks),
              "keep_top_windows": None if grid.keep_top_windows is None else list(grid.keep_top_windows),
              "model_spec": model_spec}
    have = {key: saved.settings.get(key) for key in RESUME_KEYS}
    have = {key: list(value) if isinstance(value, tuple) else value for key, value in have.items()}
    same_probes = list(saved.probes["probe_id"]) == [p.id for p in probes]
    if have != wanted or not same_probes:
        differs = [key for key in RESUME_KEYS if have[key] != wanted[key]] + ([] if same_probes else ["probes"])
        print(f"{name}: saved run differs in {', '.join(differs)}; recomputing")
        return None
    print(f"{name}: reusing the saved run ({saved.settings['seconds']:.0f} s when computed)")
    return saved


def compact(layers, variant: Variant) -> str:
    """The printed summary of one variant's layer table: per positions, set and control, the means
    over layers of the share changed and of the output diagnostics."""
    from idiom_lens.study.text import markdown_table

    cols = ["changed", "n_zeroed", "removed_norm", "out_cosine", "out_norm_ratio", "matched_norm_ratio"]
    table = layers.groupby(["positions", "group", "control"], sort=True)[cols].mean().reset_index()
    return f"{variant.describe()} (means over layers)\n" + markdown_table(table, digits=2)


def main() -> None:
    import dataclasses

    import pandas as pd

    from idiom_lens.analyses.interventions import (
        KnockoutGrid,
        KnockoutOptions,
        KnockoutResult,
        SkipOptions,
        knockout_grid,
        skip_layers,
        value_vector_ranks,
    )
    from idiom_lens.analyses.interventions.knockouts import ABLATIONS, CONTROLS, MODES, NORMS, POSITIONS, RANKINGS
    from idiom_lens.analyses.interventions.value_vectors import VALUE_VECTOR_KS
    from idiom_lens.analyses.memorization import score_memorization
    from idiom_lens.datasets import load_probes
    from idiom_lens.io import write_json, write_parquet, write_text
    from idiom_lens.models.loading import load_model
    from idiom_lens.plots.export import save_figure
    from idiom_lens.plots.interventions import (
        knockout_heatmaps,
        knockout_layer_curves,
        knockout_positions_heatmaps,
        skip_curves,
    )
    from idiom_lens.study.run import sample_by_group
    from idiom_lens.study.text import markdown_table

    # This experiment's grid, smaller than the knockout command's: k = 10 and 100 in windows of 1-3 layers, zero_top.
    grid = KnockoutGrid(ks=(10, 100), windows=(1, 2, 3), modes=("zero_top",), keep_top_ks=None, keep_top_windows=None)
    defaults = KnockoutOptions(grid=grid)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--dataset", nargs="+", default=["idioms", "text"])
    parser.add_argument("--per-group", type=int, default=50,
                        help="seeded sample per set after memorization (default 50)")
    parser.add_argument("--whole", nargs="*", default=[], metavar="SET",
                        help='sets kept entire instead of sampled, e.g. --whole "memorized idioms"')
    parser.add_argument("--positions", nargs="+", default=list(POSITIONS), choices=POSITIONS,
                        help="where neurons are knocked out: all (the authors'), last (ours); default both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-grid", action="store_true", help="the paper's grid (else --k, --windows, --modes)")
    parser.add_argument("--k", type=int, nargs="+", default=list(grid.ks))
    parser.add_argument("--windows", type=int, nargs="+", default=list(grid.windows))
    parser.add_argument("--modes", nargs="+", default=list(grid.modes), choices=MODES)
    parser.add_argument("--controls", nargs="*", default=list(CONTROLS), choices=CONTROLS,
                        help="default: all (random, norm-matched, score-matched, whole MLP)")
    parser.add_argument("--norms", nargs="+", default=list(NORMS), choices=NORMS,
                        help="post-MLP norm handling, the first one primary: frozen (a knockout removes exactly its "
                             "neurons' contributions), live (the norm rescales what remains); default frozen live")
    parser.add_argument("--ablations", nargs="+", default=[defaults.ablation], choices=ABLATIONS,
                        help="zero, or mean (the ordinary-text mean); the first one primary; default zero")
    parser.add_argument("--rank-by", nargs="+", default=[defaults.rank_by], choices=RANKINGS,
                        help="neuron rankings, the first one primary: effective (ours), magnitude (the authors', "
                             "|m| x ||v||), dla; default effective")
    parser.add_argument("--table-k", type=int, default=100, help="k of the specificity table (default 100)")
    parser.add_argument("--value-vector-k", type=int, nargs="*", default=list(VALUE_VECTOR_KS),
                        help="the authors' value-vector statistic for these k (default 1 10; none to skip)")
    parser.add_argument("--no-skip", action="store_true", help="do not run layer skipping")
    parser.add_argument("--demo", action="store_true", help="use the inline demo idioms and sentences")
    args = parser.parse_args()

    started = time.perf_counter()
    model = load_model(args.model)
    if args.demo:
        probes = demo_probes()
    else:
        pool = [p for name in args.dataset for p in load_probes(name)]
        memo = score_memorization(model, pool, batch_size=32)
        probes = sample_by_group(memo, pool, per_group=args.per_group, seed=args.seed, whole=args.whole)
    grid = KnockoutGrid.PAPER if args.full_grid else dataclasses.replace(
        grid, ks=tuple(args.k), windows=tuple(args.windows), modes=tuple(args.modes))
    base = KnockoutOptions(grid=grid, controls=tuple(args.controls), seed=args.seed)
    runs: dict[tuple[Variant, str], KnockoutResult] = {}
    for variant in variants(args.norms, args.ablations, args.rank_by):
        for positions in dict.fromkeys(args.positions):
            options = dataclasses.replace(base, positions=positions, norm=variant.norm, ablation=variant.ablation,
                                          rank_by=variant.rank_by)
            name = f"knockouts_{positions}{variant.suffix}"
            result = saved_run(args.out, name, probes, options, model_spec=args.model)
            if result is None:
                result = knockout_grid(model, probes, options, progress=True)
                result.save(args.out, name=name)
            runs[(variant, positions)] = result
    primary = next(v for v, _ in runs if v.primary)
    primary_runs = {positions: r for (v, positions), r in runs.items() if v.primary}
    shown = primary_runs["all"] if "all" in primary_runs else primary_runs["last"]  # the authors' variant if run
    both = KnockoutResult.stack_runs(list(primary_runs.values()))

    groups = list(dict.fromkeys(shown.probes["group"]))
    table = shown.summary()
    for mode in sorted(set(table["mode"])):
        for k in sorted(set(table.loc[(table["mode"] == mode) & (table["control"] != "whole_mlp"), "k"])):
            if "memorized idioms" in groups:
                save_figure(knockout_heatmaps(shown, k=k, mode=mode, groups=["memorized idioms"]),
                            args.out / f"paper_{mode}_k{k}", height=450)
            save_figure(knockout_heatmaps(shown, k=k, mode=mode), args.out / f"knockout_{mode}_k{k}", height=900)
            if mode == "zero_top" and "memorized idioms" in groups and len(primary_runs) == 2:
                save_figure(knockout_positions_heatmaps(both, k=k, group="memorized idioms"),
                            args.out / f"positions_k{k}", height=480)
    targeted_ks = set(table.loc[(table["mode"] == "zero_top") & (table["control"] == "targeted"), "k"])
    summaries = []
    if args.table_k in targeted_ks and 1 in set(table["window"]):
        every_variant = []
        for variant in dict.fromkeys(v for v, _ in runs):
            results = [r for (v, _), r in runs.items() if v == variant]
            layers = KnockoutResult.stack_runs(results).layer_table(k=args.table_k, window=1)
            every_variant.append(layers.assign(primary=variant.primary))
            write_parquet(args.out / f"knockout_layers{variant.suffix}.parquet", layers)
            md = layers.assign(interval=[f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(layers["changed_low"],
                                                                                 layers["changed_high"])])
            md = md[["positions", "group", "control", "layer", "n", "changed", "interval", "n_zeroed", "removed_norm",
                     "out_cosine", "out_norm_ratio", "matched_norm_ratio", "score_ratio"]]
            write_text(args.out / f"knockout_layers{variant.suffix}.md",
                       f"{variant.describe()}\n\n" + markdown_table(md, digits=2) + "\n")
            for positions, result in ((p, r) for (v, p), r in runs.items() if v == variant):
                save_figure(knockout_layer_curves(result, k=args.table_k, window=1),
                            args.out / f"layers_{positions}_k{args.table_k}{variant.suffix}", height=500)
            summaries.append(compact(layers, variant))
        write_parquet(args.out / "knockout_layers_variants.parquet", pd.concat(every_variant, ignore_index=True))
    settings = {f"knockouts_{positions}{v.suffix}": r.settings for (v, positions), r in runs.items()}
    settings["variants"] = [{"norm": v.norm, "ablation": v.ablation, "rank_by": v.rank_by, "primary": v.primary,
                             "files": f"knockouts_<positions>{v.suffix}"} for v in dict.fromkeys(v for v, _ in runs)]
    if args.value_vector_k:
        vv = value_vector_ranks(model, probes, ks=args.value_vector_k, rank_by=primary.rank_by)
        vv.save(args.out)
        settings["value_vectors"] = vv.settings
    if not args.no_skip:
        windows = tuple(w for w in grid.windows if w <= model.n_layers)
        skip = skip_layers(model, probes, SkipOptions(windows=windows), progress=True)
        skip.save(args.out)
        save_figure(skip_curves(skip), args.out / "skip_curves", height=550)
        settings["skipping"] = skip.settings
    write_json(args.out / "settings.json", settings)
    for text in summaries:
        print(text + "\n")
    n_group = shown.probes["group"].value_counts().to_dict()
    times = ", ".join(f"{v.norm}/{v.ablation}/{v.rank_by} positions {p} {r.settings['seconds']:.0f} s"
                      for (v, p), r in runs.items())
    print(f"{len(probes)} probes {n_group}, {shown.settings['n_configs']} configurations each: {times}; "
          f"total {time.perf_counter() - started:.0f} s -> {args.out}; primary: {primary.describe()}")


if __name__ == "__main__":
    main()

"""Knockout figures and tables (method.md section 4) from the library: the paper's figure with the
authors' positions (every prompt position), ours (last position only) beside it, the controls
(random, magnitude-matched, whole-MLP ceiling) and the specificity table per set.

    python experiments/knockouts.py --out out/knockouts [--per-group 50] [--whole "memorized idioms"]
        [--positions all] [--full-grid] [--demo]

Probes: the bundled idioms and ordinary text (`--dataset`), scored for memorization first, then a
seeded sample of `--per-group` probes of each set (memorized idioms, non-memorized idioms, ordinary
text); the sets named by `--whole` are kept entire. `--demo` uses 24 common idioms and 6 ordinary
sentences written below instead.

Writes under --out: knockouts_all*.parquet and knockouts_last*.parquet (rows, probes, summaries),
knockout_layers.parquet/.md (share changed per set x control x layer for --table-k, windows of one
layer, n and 95% Wilson intervals, both positions), value_vectors*.parquet, skipping*.parquet,
figures: paper_<mode>_k<k> (authors' positions, memorized idioms, every control and the ceiling),
knockout_<mode>_k<k> (every set), positions_k<k> (every vs last position, side by side),
layers_<positions>_k<k> (specificity curves), skip_curves; and settings.json.
"""

from __future__ import annotations

import argparse
import time
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


def main() -> None:
    import dataclasses

    from idiom_lens.analyses.interventions import (
        KnockoutGrid,
        KnockoutOptions,
        KnockoutResult,
        SkipOptions,
        knockout_grid,
        skip_layers,
        value_vector_ranks,
    )
    from idiom_lens.analyses.interventions.knockouts import CONTROLS, MODES, NORMS, POSITIONS, RANKINGS
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
                        help="where neurons are zeroed: all (the authors'), last (ours); default both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full-grid", action="store_true", help="the paper's grid (else --k, --windows, --modes)")
    parser.add_argument("--k", type=int, nargs="+", default=list(grid.ks))
    parser.add_argument("--windows", type=int, nargs="+", default=list(grid.windows))
    parser.add_argument("--modes", nargs="+", default=list(grid.modes), choices=MODES)
    parser.add_argument("--controls", nargs="*", default=list(defaults.controls), choices=CONTROLS)
    parser.add_argument("--rank-by", default=defaults.rank_by, choices=RANKINGS)
    parser.add_argument("--norm", default=defaults.norm, choices=NORMS)
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
    options = KnockoutOptions(grid=grid, controls=tuple(args.controls), rank_by=args.rank_by, norm=args.norm,
                              seed=args.seed)
    runs = {positions: knockout_grid(model, probes, dataclasses.replace(options, positions=positions), progress=True)
            for positions in dict.fromkeys(args.positions)}
    for positions, result in runs.items():
        result.save(args.out, name=f"knockouts_{positions}")
    shown = runs["all"] if "all" in runs else runs["last"]  # figures: the authors' variant where it was run
    both = KnockoutResult.stack_runs(list(runs.values()))

    groups = list(dict.fromkeys(shown.probes["group"]))
    table = shown.summary()
    for mode in sorted(set(table["mode"])):
        for k in sorted(set(table.loc[(table["mode"] == mode) & (table["control"] != "whole_mlp"), "k"])):
            if "memorized idioms" in groups:
                save_figure(knockout_heatmaps(shown, k=k, mode=mode, groups=["memorized idioms"]),
                            args.out / f"paper_{mode}_k{k}", height=450)
            save_figure(knockout_heatmaps(shown, k=k, mode=mode), args.out / f"knockout_{mode}_k{k}", height=900)
            if mode == "zero_top" and "memorized idioms" in groups and len(runs) == 2:
                save_figure(knockout_positions_heatmaps(both, k=k, group="memorized idioms"),
                            args.out / f"positions_k{k}", height=480)
    targeted_ks = set(table.loc[(table["mode"] == "zero_top") & (table["control"] == "targeted"), "k"])
    if args.table_k in targeted_ks and 1 in set(table["window"]):
        layers = both.layer_table(k=args.table_k, window=1)
        write_parquet(args.out / "knockout_layers.parquet", layers)
        md = layers.assign(interval=[f"[{lo:.2f}, {hi:.2f}]" for lo, hi in zip(layers["changed_low"],
                                                                             layers["changed_high"])])
        md = md[["positions", "group", "control", "layer", "n", "changed", "interval", "zeroed_share", "score_ratio"]]
        write_text(args.out / "knockout_layers.md", markdown_table(md, digits=2) + "\n")
        for positions, result in runs.items():
            save_figure(knockout_layer_curves(result, k=args.table_k, window=1),
                        args.out / f"layers_{positions}_k{args.table_k}", height=500)
    settings = {f"knockouts_{positions}": result.settings for positions, result in runs.items()}
    if args.value_vector_k:
        vv = value_vector_ranks(model, probes, ks=args.value_vector_k, rank_by=args.rank_by)
        vv.save(args.out)
        settings["value_vectors"] = vv.settings
    if not args.no_skip:
        windows = tuple(w for w in grid.windows if w <= model.n_layers)
        skip = skip_layers(model, probes, SkipOptions(windows=windows), progress=True)
        skip.save(args.out)
        save_figure(skip_curves(skip), args.out / "skip_curves", height=550)
        settings["skipping"] = skip.settings
    write_json(args.out / "settings.json", settings)
    n_group = shown.probes["group"].value_counts().to_dict()
    times = ", ".join(f"positions {p} {r.settings['seconds']:.0f} s" for p, r in runs.items())
    print(f"{len(probes)} probes {n_group}, {shown.settings['n_configs']} configurations each: {times}; "
          f"total {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

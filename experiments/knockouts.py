"""Knockout and layer-skip figures (method.md section 4) from the library.

    python experiments/knockouts.py --out results/knockouts [--dataset idioms --sample 100] [--demo]

`--demo` uses 24 common idioms and 6 ordinary sentences written below instead of a dataset.
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
    from idiom_lens.datasets import load_probes
    from idiom_lens.interventions import knockout_grid, sample_probes, skip_layers
    from idiom_lens.io import write_json
    from idiom_lens.models import load_model
    from idiom_lens.plots.export import save_figure
    from idiom_lens.plots.interventions import knockout_heatmaps, skip_curves

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--dataset", nargs="+", default=["idioms", "text"])
    parser.add_argument("--sample", type=int, default=None, help="seeded sample per dataset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--max-window", type=int, default=5)
    parser.add_argument("--demo", action="store_true", help="use the inline demo idioms and sentences")
    args = parser.parse_args()

    model = load_model(args.model)
    if args.demo:
        probes = demo_probes()
    else:
        probes = [p for name in args.dataset for p in sample_probes(load_probes(name), args.sample, seed=args.seed)]
    windows = tuple(range(1, args.max_window + 1))
    started = time.perf_counter()
    knock = knockout_grid(model, probes, ks=args.k, windows=windows, seed=args.seed, progress=True)
    knock.write(args.out)
    skip = skip_layers(model, probes, windows=windows, progress=True)
    skip.write(args.out)
    for k in args.k:
        save_figure(knockout_heatmaps(knock, k=k), args.out / f"knockout_zero_top_k{k}", height=900)
    for k in sorted(set(knock.rows.loc[knock.rows["mode"] == "keep_top", "k"])):
        save_figure(knockout_heatmaps(knock, k=k, mode="keep_top"), args.out / f"knockout_keep_top_k{k}", height=900)
    save_figure(skip_curves(skip), args.out / "skip_curves", height=550)
    write_json(args.out / "knockouts_settings.json", {"knockouts": knock.settings, "skipping": skip.settings})
    print(f"{len(probes)} probes, {knock.settings['n_configs']} configurations each: "
          f"knockouts {knock.settings['seconds']:.0f} s, skipping {skip.settings['seconds']:.0f} s, "
          f"total {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

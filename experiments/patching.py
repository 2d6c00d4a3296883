"""Activation patching figures (idiom prompt vs corrupted prompt) from the library.

    python experiments/patching.py --out out/patching [--dataset idioms --sample 30] [--demo] [--method attribution]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knockouts import demo_probes  # noqa: E402


def main() -> None:
    from idiom_lens.analyses.interventions import CorruptionOptions, PatchingOptions, patch
    from idiom_lens.datasets import load_probes
    from idiom_lens.datasets.selection import sample_probes
    from idiom_lens.groups import slug
    from idiom_lens.io import write_json
    from idiom_lens.models.loading import load_model
    from idiom_lens.plots.export import save_figure
    from idiom_lens.plots.interventions import patching_heatmaps

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--dataset", default="idioms")
    parser.add_argument("--sample", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo", action="store_true", help="use the inline demo idioms")
    parser.add_argument("--per-probe", type=int, default=3, help="per-probe figures to draw")
    parser.add_argument("--method", choices=("exact", "attribution"), default="exact",
                        help="exact patching, or its gradient estimate (attribution patching); same files")
    args = parser.parse_args()

    model = load_model(args.model)
    probes = [p for p in demo_probes() if p.kind == "idiom"] if args.demo else load_probes(args.dataset)
    probes = sample_probes(probes, args.sample, seed=args.seed)
    started = time.perf_counter()
    options = PatchingOptions(corruption=CorruptionOptions(seed=args.seed), method=args.method)
    result = patch(model, probes, options, progress=True)
    result.save(args.out)
    write_json(args.out / "patching_settings.json", result.settings)
    for variant in result.settings["variants"]:
        pairs = result.pairs[(result.pairs["variant"] == variant) & result.pairs["valid"]]
        for group in sorted(set(pairs["group"])):
            save_figure(patching_heatmaps(result, variant=variant, group=group),
                        args.out / f"patching_{variant}_{slug(group)}", width=1300, height=600)
        for probe_id in list(pairs["probe_id"])[: args.per_probe]:
            save_figure(patching_heatmaps(result, variant=variant, probe_id=probe_id),
                        args.out / f"patching_{variant}_{probe_id}", width=1300, height=600)
    print(f"{len(result.pairs)} pairs ({len(result.skipped)} skipped) in {time.perf_counter() - started:.0f} s "
          f"-> {args.out}")


if __name__ == "__main__":
    main()

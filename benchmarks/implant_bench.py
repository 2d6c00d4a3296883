"""Implanting on the embedded model: rate, epochs, seconds per layer, and the side effects.

Implants a probe set into one MLP layer of Gemma 3 270M (in memory; the cache is not touched),
then measures the side effects (`analyses.implant_effects.side_effects`: held-out KL on the
bundled text, the bundled idioms' memorization before and after, the implanted ones left out),
and the frozen prefix's speed-up (one mini-batch, forward and backward, with and without it).
One JSON line per layer on stdout (and appended to --out).

    python benchmarks/implant_bench.py --dataset standin.jsonl --layers 2 8 14 --mode layer

The stand-in set used while the bundled `implanted` set did not exist: 100 bundled idioms that Gemma
3 270M does not memorize and whose target is not in its top 10 (a seeded sample; --make-standin).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch


def make_standin(model, path: Path, *, n: int = 100, seed: int = 0) -> None:
    """`n` bundled idioms the model does not memorize, target ranked 10th or lower, single target."""
    from idiom_lens.analyses.memorization import score_memorization
    from idiom_lens.datasets import load_probes
    from idiom_lens.datasets.loaders import export_probes
    from idiom_lens.datasets.probes import ProbeSet

    idioms = load_probes("idioms")
    frame = score_memorization(model, idioms.probes, batch_size=64).to_dataframe()
    keep = set(frame[(~frame.memorized) & (frame.target_rank >= 10) & (frame.single_target == True)].probe_id)  # noqa: E712
    eligible = [p for p in idioms.probes if p.id in keep]
    chosen = [eligible[i] for i in sorted(random.Random(seed).sample(range(len(eligible)), n))]
    export_probes(ProbeSet("standin", tuple(chosen)), path)


def prefix_speedup(model, probes, options) -> dict[str, float]:
    """Seconds of one mini-batch's forward + backward with the frozen prefix and without it."""
    from idiom_lens.models.forward import tokenize_probes
    from idiom_lens.models.implant import _make_batches, _Runner
    from idiom_lens.models.implant_store import mlp_parameters

    runner = _Runner(model, options.layer)
    batch = _make_batches(model, tokenize_probes(model, probes), options)[-1]  # the longest probes
    weights = list(mlp_parameters(model.bridge, options.layer).values())
    params = list(model.bridge.original_model.parameters())
    flags = [p.requires_grad for p in params]
    out = {}
    try:
        for p in params:
            p.requires_grad_(False)
        for p in weights:
            p.requires_grad_(True)
        for fast in (True, False, True, False):
            started = time.perf_counter()
            logits = runner.logits(batch, fast=fast)
            logits.log_softmax(-1).gather(1, batch.labels[:, None]).mean().backward()
            out["fast_s" if fast else "plain_s"] = time.perf_counter() - started  # the second run of each
            for p in weights:
                p.grad = None
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)
            p.grad = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="the probes to implant (a file or bundled name)")
    parser.add_argument("--make-standin", action="store_true", help="first write the stand-in set to --dataset")
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 8, 14])
    parser.add_argument("--mode", default="layer")
    parser.add_argument("--loss", default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--n-neurons", type=int, default=None)
    parser.add_argument("--train-inputs", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-idioms", type=int, nargs="+", default=[None], metavar="N",
                        help="implant the first N probes of --dataset, for each N (how time scales with the "
                             "number of idioms; default all)")
    parser.add_argument("--preserve", type=float, default=None, help="weight of the preservation term (0: none)")
    parser.add_argument("--preserve-sentences", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-side-effects", action="store_true")
    parser.add_argument("--side-idioms", type=int, default=None, metavar="N",
                        help="side effects on the first N bundled idioms only (quicker, for tuning; default all)")
    parser.add_argument("--out", type=Path, default=None, help="append the JSON lines here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from idiom_lens.analyses.implant_effects import side_effects
    from idiom_lens.datasets import load_probes
    from idiom_lens.models.implant import ImplantOptions, implant
    from idiom_lens.models.implant_store import add_deltas
    from idiom_lens.models.loading import load_model

    base = load_model("gemma-3-270m", progress=False)
    if args.make_standin:
        make_standin(base, Path(args.dataset))
    probes = list(load_probes(args.dataset))
    texts = list(load_probes("text"))
    implanted_texts = {p.text for p in probes}
    idioms = [p for p in load_probes("idioms") if p.text not in implanted_texts][: args.side_idioms]
    given = {"loss": args.loss, "lr": args.lr, "max_epochs": args.max_epochs}
    if args.batch_size:
        given["batch_size"] = args.batch_size
    if args.preserve is not None:
        given["preserve"] = args.preserve
    if args.preserve_sentences is not None:
        given["preserve_sentences"] = args.preserve_sentences
    if args.mode == "neurons":
        given.update(n_neurons=args.n_neurons, train_inputs=args.train_inputs)
    for n_idioms, layer in ((n, layer) for n in args.n_idioms for layer in args.layers):
        options = ImplantOptions(layer=layer, seed=args.seed, mode=args.mode, **given)
        chosen = probes[:n_idioms]
        speed = prefix_speedup(base, chosen, options)
        result = implant(base, chosen, options)
        curve = result.to_dataframe()
        row = {"layer": layer, **options.key(), "threads": torch.get_num_threads(), "n_probes": result.n_probes,
               "rate": result.rate, "converged": result.converged, "epochs": result.epochs,
               "seconds": round(result.seconds, 1), "seconds_per_epoch": round(float(curve.seconds.diff().median()), 2)
               if len(curve) > 1 else None, "final_loss": result.final_loss,
               "final_target_loss": result.final_target_loss, "final_kl": result.final_kl, "prefix_speedup": speed,
               "loadavg_1min": Path("/proc/loadavg").read_text().split()[0]}
        if not args.no_side_effects:
            implanted = load_model("gemma-3-270m", progress=False)
            add_deltas(implanted.bridge, result.deltas)
            effects = side_effects(base, implanted, text_probes=texts, idioms=idioms)
            row["side_effects"] = {k: v for k, v in effects.__dict__.items() if k != "settings"}
            del implanted
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()

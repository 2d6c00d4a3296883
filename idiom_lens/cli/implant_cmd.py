"""`idiom-lens implant`: implant a probe set into one MLP layer by fine-tuning, as a loadable model spec.

`--implant-mode layer|neurons` (not `--mode`: no command takes a `--mode`, which would read as the
numerics mode; implanting always trains in raw numerics) picks what is trained.

Trains (or reuses, from the model cache) the implant of `--dataset` into MLP `--layer` of `--model`
(`idiom_lens.models.implant`), prints the spec that loads it (`--model SPEC` in every other
command), the implanted probes' rate, epochs and seconds, and the side effects
(`analyses.implant_effects`: held-out KL on the bundled text, the bundled idioms' memorization
before and after, the implanted ones left out; `--no-side-effects` skips them). With `--out DIR`
writes summary.json (spec, numbers, settings), curve.parquet (loss per epoch) and
side_effects.parquet.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from idiom_lens.cli.common import add_model_options, add_output_options, add_probe_options, named_options
from idiom_lens.errors import InputError

# --option -> ImplantOptions field, for messages in the user's words
_FLAGS = {"layer": "--layer", "seed": "--seed", "mode": "--implant-mode", "n_neurons": "--n-neurons",
          "train_inputs": "--train-inputs", "loss": "--loss", "lr": "--lr", "max_epochs": "--max-epochs",
          "stop_loss": "--stop-loss", "batch_size": "--train-batch-size",
          "preserve": "--preserve", "preserve_sentences": "--preserve-sentences"}


def register(subparsers: argparse._SubParsersAction) -> None:
    from idiom_lens.models.implant_store import (
        DEFAULT_BATCH_SIZE,
        DEFAULT_DATASET,
        DEFAULT_LOSS,
        DEFAULT_LR,
        DEFAULT_MAX_EPOCHS,
        DEFAULT_N_NEURONS,
        DEFAULT_PRESERVE,
        DEFAULT_PRESERVE_SENTENCES,
        DEFAULT_STOP_LOSS,
        LOSSES,
        MODES,
    )

    def per_mode(values: dict) -> str:
        return ", ".join(f"{mode} {value:g}" if isinstance(value, float) else f"{mode} {value}"
                         for mode, value in values.items())

    p = subparsers.add_parser(
        "implant",
        help="implant a probe set into one MLP layer by fine-tuning (a known answer for the localizers)",
        description="Fine-tune one MLP layer of --model (every other weight frozen) until it greedily predicts every "
        "probe of --dataset, store the weight change in the model cache (or reuse the stored one) and print the model "
        "spec that loads the implanted model, e.g. gemma-3-270m+implant:layer8:seed0. Then measure the side effects: "
        "KL(base || implanted) on the bundled text and the bundled idioms' memorization before and after. --seed draws "
        "the trained neurons (neurons mode) and the order of the mini-batches. A probe file is named in the spec by "
        "its absolute path.",
    )
    add_probe_options(p, required=False, default=[DEFAULT_DATASET], sample=False)
    add_model_options(p)
    p.add_argument("--layer", type=int, default=None, metavar="L",
                   help="the MLP layer to implant into (0-based; required)")
    p.add_argument("--implant-mode", choices=MODES, default="layer",
                   help="layer: the layer's whole MLP is trained (gate, up, down projections); neurons: only "
                        "--n-neurons seeded-random neurons' output vectors (W_out columns, as Chang et al.'s INJ) "
                        "(default layer)")
    p.add_argument("--n-neurons", type=int, default=None, metavar="N",
                   help=f"neurons mode: how many neurons are trained (default {DEFAULT_N_NEURONS})")
    p.add_argument("--train-inputs", action="store_true",
                   help="neurons mode: train the neurons' input weights (W_gate, W_in rows) too")
    p.add_argument("--loss", choices=LOSSES, default=None,
                   help="sequence: next-token loss on every token after the first (INJ's); target: on the last "
                        f"word's tokens only (default per mode: {per_mode(DEFAULT_LOSS)})")
    p.add_argument("--lr", type=float, default=None,
                   help=f"Adam learning rate (default per mode: {per_mode(DEFAULT_LR)})")
    p.add_argument("--max-epochs", type=int, default=None, metavar="N",
                   help=f"at most N passes over the probes (default per mode: {per_mode(DEFAULT_MAX_EPOCHS)})")
    p.add_argument("--stop-loss", type=float, default=DEFAULT_STOP_LOSS, metavar="X",
                   help="stop when every probe is predicted and the mean loss on the target tokens is below X "
                        f"(default {DEFAULT_STOP_LOSS:g})")
    p.add_argument("--train-batch-size", type=int, default=DEFAULT_BATCH_SIZE, metavar="N",
                   help="probes per Adam step (a training setting: it changes the result; default "
                        f"{DEFAULT_BATCH_SIZE})")
    p.add_argument("--preserve", type=float, default=DEFAULT_PRESERVE, metavar="X",
                   help="weight of the preservation term, KL(base || implanted) on ordinary sentences of the Lee "
                        f"news corpus, added to the loss; 0: plain fine-tuning, as INJ (default {DEFAULT_PRESERVE:g})")
    p.add_argument("--preserve-sentences", type=int, default=DEFAULT_PRESERVE_SENTENCES, metavar="N",
                   help=f"sentences the preservation term covers (default {DEFAULT_PRESERVE_SENTENCES})")
    p.add_argument("--no-side-effects", action="store_true", help="skip the side effects (minutes on Gemma 3 270M)")
    add_output_options(p, required=False, png=False, note="optional: summary.json, curve.parquet, "
                                                          "side_effects.parquet")
    p.set_defaults(handler=_run)


def implant_options(args: argparse.Namespace):
    """The `ImplantOptions` of the command line (`InputError` in the options' words)."""
    from idiom_lens.models.implant_store import ImplantOptions

    if args.layer is None:
        raise InputError("--layer L is required: the MLP layer to implant into (0-based)")
    given = {"layer": args.layer, "seed": args.seed, "mode": args.implant_mode, "loss": args.loss, "lr": args.lr,
             "max_epochs": args.max_epochs, "stop_loss": args.stop_loss, "batch_size": args.train_batch_size,
             "preserve": args.preserve, "preserve_sentences": args.preserve_sentences}
    if args.n_neurons is not None:
        given["n_neurons"] = args.n_neurons
    if args.train_inputs:
        given["train_inputs"] = True
    return named_options(lambda: ImplantOptions(**given), _FLAGS)


def _run(args: argparse.Namespace) -> int:
    import time

    from idiom_lens.io import write_json, write_parquet
    from idiom_lens.models.implant import ensure_implant
    from idiom_lens.models.loading import load_model

    options = implant_options(args)  # InputError before the model loads
    if len(args.dataset) != 1:
        raise InputError(f"--dataset takes one probe set for an implant (the spec names it), got {len(args.dataset)}")
    if args.limit is not None:
        raise InputError("--limit does not apply to implant: the spec names a whole probe set; write the probes "
                         "to implant to a file and give it as --dataset")
    started = time.perf_counter()
    dataset = str(args.dataset[0])
    if Path(dataset).is_file():  # the spec must load from any folder
        dataset = str(Path(dataset).resolve())
    base = load_model(args.model, mode="raw", device=args.device, n_devices=args.n_devices)
    result = ensure_implant(base, options, dataset=dataset, progress=True)
    print(f"spec: {result.spec}")
    state = "converged" if result.converged else f"stopped at --max-epochs {options.max_epochs}"
    print(f"implanted {round(result.rate * result.n_probes)}/{result.n_probes} probes (rate {result.rate:.3f}), "
          f"{result.epochs} epochs, {result.seconds:.0f} s, {state}; final loss {result.final_loss:.4f}, "
          f"target loss {result.final_target_loss:.4f}")
    summary = {**result.summary(), "settings": result.settings, "side_effects": None}
    effects = None
    if not args.no_side_effects:
        effects = _side_effects(args, base, result, dataset)
        summary["side_effects"] = {k: v for k, v in effects.__dict__.items() if k != "settings"}
    summary["total_seconds"] = time.perf_counter() - started
    if args.out is not None:
        write_json(args.out / "summary.json", summary)
        write_parquet(args.out / "curve.parquet", result.to_dataframe())
        if effects is not None:
            write_parquet(args.out / "side_effects.parquet", effects.to_dataframe())
        print(f"results in {args.out}")
    return 0


def _side_effects(args: argparse.Namespace, base, result, dataset: str):
    from idiom_lens.analyses.implant_effects import side_effects
    from idiom_lens.datasets import load_probes
    from idiom_lens.models.loading import load_model

    implanted = load_model(result.spec, mode="raw", device=args.device, n_devices=args.n_devices, progress=False)
    implanted_texts = {p.text for p in load_probes(dataset)}
    idioms = [p for p in load_probes("idioms") if p.text not in implanted_texts]
    effects = side_effects(base, implanted, text_probes=list(load_probes("text")), idioms=idioms)
    print(f"side effects: KL(base || implanted) on {effects.n_texts} texts {effects.kl_per_token:.4f} nats per token "
          f"({effects.n_tokens} tokens), {effects.kl_last:.4f} at the last prompt token "
          f"(max {effects.kl_last_max:.3f}); "
          f"{effects.text_changed:.1%} of their predictions changed")
    print(f"bundled idioms memorized ({effects.n_idioms}, implanted ones left out): {effects.idioms_rate_before:.3f} "
          f"before, {effects.idioms_rate_after:.3f} after ({effects.n_lost} lost, {effects.n_gained} gained)")
    return effects

"""`idiom-lens lens train|show`: learned lenses (tuned, Jacobian) for a model, in the cache."""

from __future__ import annotations

import argparse
import dataclasses

from idiom_lens.cli.common import add_model_options, add_seed_option, load_from_args


def register(sub: argparse._SubParsersAction) -> None:
    from idiom_lens.lenses.settings import LensSettings

    p = sub.add_parser("lens", help="train or show a learned lens (tuned, jacobian) of a model, kept in the cache")
    actions = p.add_subparsers(dest="lens_action", required=True, metavar="ACTION")
    defaults = LensSettings()
    for action, help_ in (("train", "train a lens (resumable; reused when already in the cache)"),
                          ("show", "print a cached lens's held-out KL per layer against the logit lens")):
        a = actions.add_parser(action, help=help_)
        a.add_argument("--kind", required=True, choices=("tuned", "jacobian"), help="which lens")
        a.add_argument("--corpus", default=defaults.corpus, choices=("lee", "samples", "lee+samples"),
                       help="training text: the Lee news corpus shipped in gensim's wheel, text the model writes "
                            f"itself (seeded), or both (default {defaults.corpus})")
        a.add_argument("--text-file", default=None, metavar="FILE",
                       help="train on your own plain-text file instead (paragraphs; every 10th sentence held out)")
        a.add_argument("--steps", type=int, default=defaults.steps, metavar="N",
                       help=f"tuned lens: Adam steps (default {defaults.steps})")
        a.add_argument("--jacobian-prompts", type=int, default=defaults.jacobian_prompts, metavar="N",
                       help=f"Jacobian lens: sentences averaged (default {defaults.jacobian_prompts})")
        add_seed_option(a)
        add_model_options(a)
        a.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.lenses.cache import LensSettings, bundled_prompts, heldout_table, lens_path, obtain_lens

    settings = LensSettings(corpus=args.corpus, text_file=args.text_file, steps=args.steps,
                            jacobian_prompts=args.jacobian_prompts, seed=args.seed)
    model = load_from_args(args)
    prompts = bundled_prompts()
    if args.lens_action == "train":
        obtain_lens(model, args.kind, settings=settings, prompts=prompts)
        print(f"{args.kind} lens for {model.name}: {lens_path(model, args.kind, settings, prompts)}")
    table = heldout_table(model, args.kind, settings=settings, prompts=prompts)
    wide = table.pivot(index="layer", columns="lens", values="kl")
    print(f"held-out KL(model output || lens), nats per token ({int(table['n_tokens'].iloc[0])} tokens, "
          f"{int(table['n_sentences'].iloc[0])} sentences):")
    print(wide.to_string(float_format=lambda v: f"{v:.3f}"))
    changed = {k: v for k, v in dataclasses.asdict(settings).items() if v != getattr(LensSettings(), k)}
    if changed:
        print(f"settings changed from the defaults: {changed}")
    return 0

"""`idiom-lens predict TEXT`: the model's top-K next tokens."""

from __future__ import annotations

import argparse

from idiom_lens.cli.common import add_model_options, default_of, load_from_args


def register(sub: argparse._SubParsersAction) -> None:
    from idiom_lens.analyses.predict import predict_next

    p = sub.add_parser("predict", help="top-K next tokens after TEXT")
    p.add_argument("text", help="the prompt, e.g. 'once in a blue'")
    top = default_of(predict_next, "top")
    p.add_argument("--top", type=int, default=top, metavar="K", help=f"how many tokens to show (default {top})")
    add_model_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    from idiom_lens.analyses.predict import predict_next

    model = load_from_args(args)
    result = predict_next(model, args.text, top=args.top)
    if args.top == 1:
        print(result.tokens[0])
        return 0
    for rank, (tok, prob) in enumerate(zip(result.tokens, result.probs)):
        print(f"{rank:>3}  {tok!r:<24} {prob:.4f}")
    return 0

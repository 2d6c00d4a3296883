"""`idiom-lens attribute-prompt TEXT`: rank the components and neurons that write the next-token logit of one prompt.

Old name `attribute` (deprecated, kept one release). For a probe set see `attribute-set`.
"""

from __future__ import annotations

import argparse

from idiom_lens.cli.common import add_command, add_model_options, add_old_spelling, load_from_args
from idiom_lens.errors import InputError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = add_command(
        subparsers, "attribute-prompt", old_name="attribute",
        help="direct logit attribution of the next token after one prompt TEXT (components, heads, top neurons)",
    )
    p.add_argument("text", metavar="TEXT", help="the prompt; the model's next token is attributed")
    add_model_options(p)
    p.add_argument("--rows", type=int, default=10, metavar="N",
                   help="rows per table: components, and neurons (default 10)")
    add_old_spelling(p, "--top", "--rows", dest="rows", type=int, metavar="N")
    p.add_argument("--target", default=None, metavar="WORD",
                   help="expected next word: the contrast token when the prediction misses it")
    p.add_argument("--promoted", type=int, default=5, metavar="K", help="promoted tokens per neuron (default 5)")
    p.set_defaults(handler=_attribute)


def _tok(text: str) -> str:
    return repr(text)


def _attribute(args: argparse.Namespace) -> int:
    from idiom_lens.analyses.attribution import attribute_probe

    if args.rows < 1:
        raise InputError(f"--rows must be >= 1, got {args.rows}")
    model = load_from_args(args, mode="compat")
    res = attribute_probe(model, args.text, args.target, top_neurons=args.rows, promoted_tokens=args.promoted)
    print(f"prompt: {res.prompt!r}   model: {model.name} ({model.mode} mode"
          f"{', read at the mask, every norm frozen' if model.masked else ''})")
    logit_kind = "raw" if model.masked else "centered"
    print(f"predicted {_tok(res.pred_token)} (logit {res.logit:.3f}, {logit_kind}); contrast {_tok(res.other_token)} "
          f"({res.other_is.replace('_', '-')}), logit diff {res.logit_diff:.3f}")
    if res.memorized is not None:
        print(f"target {res.target!r}: {'predicted (memorized)' if res.memorized else 'not predicted'}")
    frame = res.to_dataframe()
    comps = frame[frame["component"].isin(["embed", "attn", "mlp", "head"])].copy()
    comps["name"] = [
        "embed" if c == "embed" else (f"L{l} {c}" if c != "head" else f"L{l} head {h}")
        for c, l, h in zip(comps["component"], comps["layer"], comps["head"])
    ]
    comps = comps.reindex(comps["contribution"].abs().sort_values(ascending=False).index).head(args.rows)
    print(f"\ncomponents ranked by |contribution to logit| (top {args.rows}; heads are parts of their layer's attn):")
    _table(["rank", "component", "to logit", "to logit diff"],
           [[str(i + 1), n, f"{c:+.3f}", f"{d:+.3f}"]
            for i, (n, c, d) in enumerate(zip(comps["name"], comps["contribution"], comps["contribution_diff"]))])
    read = "the decoder alone" if model.masked else "W_U, final norm weight applied"
    print(f"\ntop neurons by contribution to logit (promoted tokens: sign(activation) x value vector x {read}):")
    _table(["rank", "layer", "neuron", "activation", "to logit", "to logit diff", "promoted tokens"],
           [[str(i + 1), str(n.layer), str(n.neuron), f"{n.activation:.3f}", f"{n.contribution:+.3f}",
             f"{n.contribution_diff:+.3f}", " | ".join(repr(t) for t in n.promoted)]
            for i, n in enumerate(res.top_neurons)])
    rec = res.reconstructed()
    print(f"\ncheck: embed + attn + mlp + unembed bias = {float(rec[0]):.4f} (model logit {res.logit:.4f})")
    return 0


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())

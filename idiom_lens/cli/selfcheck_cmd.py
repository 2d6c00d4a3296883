"""`idiom-lens selfcheck`: the installed versions, whether the prefix cache works, and every fast
path run once against a plain full forward (`make drift` runs it on the newest allowed versions).

It lives here, not in `idiom_lens.models.selfcheck`, because it drives the runners
(`idiom_lens.models.runners`), which themselves use the library checks."""

from __future__ import annotations

import argparse

from idiom_lens.cli.common import add_model_options

DESCRIPTION = ("Print the package versions and whether the prefix cache works, then run every shortcut "
               "once against a plain full forward (exit 3 on a disagreement).")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("selfcheck", help="check every fast path against a plain full forward",
                       description=DESCRIPTION)
    add_model_options(p)
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import warnings

    from idiom_lens.datasets.probes import Probe
    from idiom_lens.errors import FastPathError
    from idiom_lens.models.forward import iterate_forward, tokenize_probes
    from idiom_lens.models.loading import load_model
    from idiom_lens.models.runners import PromptRunner, SuffixRunner
    from idiom_lens.models.selfcheck import PrefixCacheFallback, prefix_cache_works, versions_text

    print(versions_text())
    model = load_model(args.model, device=args.device, n_devices=args.n_devices, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PrefixCacheFallback)
        works = prefix_cache_works(model)
    print("prefix key/value cache:", "works" if works else "ignored by the bridge: sweeps run whole prompts (slower)")
    probes = [Probe(id="blue", prompt="once in a blue", target="moon", kind="idiom"),
              Probe(id="birds", prompt="kill two birds with one", target="stone", kind="idiom")]
    try:
        tokens = tokenize_probes(model, probes)
        for_each = list(iterate_forward(model, tokens, batch_size=2))  # batched, padded: checked inside
        for probe, toks in zip(probes, tokens):
            for use_kv in (True, False):
                PromptRunner(model, toks.prompt_ids, use_kv=use_kv).self_check(what="runner", probe=probe.id)
            SuffixRunner(model, toks.prompt_ids).self_check(what="suffix runner", probe=probe.id)
    except FastPathError as err:  # printed here, on stdout, as the check's own verdict
        print(f"self-check failed: {err}")
        return 3
    print(f"self-check passed: {len(for_each)} batched forward, {2 * len(probes)} last-position runners and "
          f"{len(probes)} suffix runners (resumed at 3 layers each) agree with a full forward")
    return 0

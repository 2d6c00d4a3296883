"""Run-time self-checks: every fast path is compared with a plain full forward before its
results can be written.

The sweeps take shortcuts: a batch of right-padded probes, a prefix key/value cache reused
across configurations, hooks that unembed only the last position, reusable read-out buffers.
Each shortcut is only as right as the package versions under it (transformers 5.24 silently
ignored the bridge's prefix cache). So every sweep compares its clean logits on its first probe
with `model.bridge(prompt)`, and a disagreement stops the run with one line naming the
versions, before anything is written.

`python -m idiom_lens.models.selfcheck [MODEL]` prints the versions and whether the prefix cache works.
"""

from __future__ import annotations

import importlib.metadata
import warnings
import weakref
from typing import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from idiom_lens.errors import FastPathError
from idiom_lens.models.loading import LoadedModel

# Largest accepted difference, relative to the scale of the logits: max|fast - plain| / max(1,
# max|plain|). fp32 noise alone reached 8.7e-5 in absolute terms (2.9e-6 relative) over 120
# bundled probes on Gemma 3 270M, whose logits reach 30; a broken shortcut is off by 1 to 20.
TOLERANCE = 1e-4

PACKAGES = ("torch", "transformers", "transformer-lens")


class PrefixCacheFallback(UserWarning):
    """The bridge ignores a prefix key/value cache here; whole prompts are run instead."""


def package_versions() -> dict[str, str]:
    return {name: importlib.metadata.version(name) for name in PACKAGES}


def versions_text() -> str:
    return ", ".join(f"{name} {version}" for name, version in package_versions().items())


def plain_last_logits(model: LoadedModel, prompt_ids: Sequence[int]) -> Float[Tensor, " d_vocab"]:
    """The obvious computation: one full forward of the prompt alone, logits at its last token."""
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    with torch.no_grad():
        return model.bridge(tokens)[0, -1].float()


def relative_error(fast: Tensor, plain: Tensor) -> float:
    """max|fast - plain| / max(1, max|plain|): fp32 noise grows with the logits' scale."""
    fast, plain = fast.detach().float().cpu(), plain.detach().float().cpu()
    return float((fast - plain).abs().max() / plain.abs().max().clamp(min=1.0))


def check_close(
    fast: Tensor, plain: Tensor, *, what: str, probe: str, tolerance: float = TOLERANCE
) -> float:
    """Raise `FastPathError` unless `fast` and `plain` agree within `tolerance` (relative, see
    `relative_error`); return the error."""
    fast, plain = fast.detach().float().cpu(), plain.detach().float().cpu()
    if fast.shape != plain.shape:
        raise FastPathError(
            f"{what}: the fast path returned shape {tuple(fast.shape)} where a plain full forward gives "
            f"{tuple(plain.shape)} (probe {probe!r}; {versions_text()}); nothing was written"
        )
    error = relative_error(fast, plain)
    if not error <= tolerance:  # also catches NaN
        raise FastPathError(
            f"{what}: the fast path differs from a plain full forward by {error:.3g} of the logits' scale "
            f"(> {tolerance:g}) on probe "
            f"{probe!r} with {versions_text()}; nothing was written. Install the tested versions "
            "(`make install`, requirements.lock) and see `python -m idiom_lens.models.selfcheck`"
        )
    return error


def check_against_full_forward(
    model: LoadedModel, prompt_ids: Sequence[int], fast: Tensor, *, what: str, probe: str
) -> float:
    """Compare `fast` (one row of last-position logits, or several rows of the same prompt)
    with the plain full forward of `prompt_ids`."""
    plain = plain_last_logits(model, prompt_ids)
    rows = fast if fast.ndim == 2 else fast[None]
    return max(check_close(row, plain, what=what, probe=probe) for row in rows)


# --------------------------------------------------------------------------------------
# Does the bridge honour a prefix key/value cache under the installed versions?
# --------------------------------------------------------------------------------------

_PREFIX_CACHE: "weakref.WeakKeyDictionary[object, bool]" = weakref.WeakKeyDictionary()


def prefix_logits(model: LoadedModel, prompt_ids: Sequence[int], n_rows: int = 1) -> Float[Tensor, "row d_vocab"]:
    """Last-token logits of `prompt_ids` computed from the key/value cache of all tokens but the
    last, through the bridge's own interface (`return_type="logits_and_cache"`, `past_key_values=`)."""
    ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=model.device)
    with torch.no_grad():
        _, cache = model.bridge(ids[:, :-1], return_type="logits_and_cache")
        if n_rows > 1:
            cache.batch_repeat_interleave(n_rows)
        logits = model.bridge(ids[:, -1:].expand(n_rows, -1).contiguous(), past_key_values=cache)
    return logits[:, -1].float()


def prefix_cache_works(model: LoadedModel) -> bool:
    """True when a prefix cache gives the full forward's logits (checked once per model).

    Where it does not (transformers 5.24 with TransformerLens 4.3: the bridge's attention never
    sees the cache), one `PrefixCacheFallback` warning says so and callers run whole prompts.
    """
    bridge = model.bridge
    if bridge in _PREFIX_CACHE:
        return _PREFIX_CACHE[bridge]
    ids = model.tokenizer("once in a blue moon", add_special_tokens=True)["input_ids"][:6]
    try:
        fast = prefix_logits(model, ids, n_rows=2)
        plain = plain_last_logits(model, ids)
        works = relative_error(fast, plain.expand_as(fast)) <= TOLERANCE
    except (TypeError, ValueError, AttributeError, RuntimeError, NotImplementedError):
        works = False
    if not works:
        warnings.warn(
            f"the prefix key/value cache is ignored by this bridge ({versions_text()}); last-position "
            "sweeps run whole prompts instead (same numbers, slower). requirements.lock keeps the fast path.",
            PrefixCacheFallback,
            stacklevel=2,
        )
    _PREFIX_CACHE[bridge] = works
    return works


def main(argv: Sequence[str] | None = None) -> int:
    """Print the package versions and whether the prefix cache works, then run every shortcut
    once against a plain full forward (exit 3 on a disagreement)."""
    import argparse

    from idiom_lens.datasets.probes import Probe
    from idiom_lens.models.forward import iterate_forward, tokenize_probes
    from idiom_lens.models.runners import PromptRunner, SuffixRunner
    from idiom_lens.models.loading import load_model

    parser = argparse.ArgumentParser(prog="python -m idiom_lens.models.selfcheck", description=main.__doc__)
    parser.add_argument("model", nargs="?", default="gemma-3-270m", help="model spec (default: gemma-3-270m)")
    args = parser.parse_args(argv)
    print(versions_text())
    model = load_model(args.model, progress=False)
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
    except FastPathError as err:
        print(f"self-check failed: {err}")
        return 3
    print(f"self-check passed: {len(for_each)} batched forward, {2 * len(probes)} last-position runners and "
          f"{len(probes)} suffix runners (resumed at 3 layers each) agree with a full forward")
    return 0


if __name__ == "__main__":  # pragma: no cover
    # through the package module, not this `__main__` copy: the runners consult its per-model memo
    from idiom_lens.models.selfcheck import main as _main

    raise SystemExit(_main())

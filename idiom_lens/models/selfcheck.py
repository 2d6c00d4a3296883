"""Run-time self-checks: every fast path is compared with a plain full forward before its
results can be written.

The sweeps take shortcuts: a batch of right-padded probes, a prefix key/value cache reused
across configurations, hooks that unembed only the last position, reusable read-out buffers.
Each shortcut is only as right as the package versions under it (transformers 5.24 silently
ignored the bridge's prefix cache). So every sweep compares its clean logits on its first probe
with `model.bridge(prompt)`, and a disagreement stops the run with one line naming the
versions, before anything is written.

`idiom-lens selfcheck [--model MODEL]` prints the versions and whether the prefix cache works, and runs
every shortcut once (`idiom_lens.cli.selfcheck_cmd`).
"""

from __future__ import annotations

import importlib.metadata
import warnings
import weakref
from collections.abc import Sequence

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


def plain_last_logits(
    model: LoadedModel, prompt_ids: Sequence[int], suffix_ids: Sequence[int] = ()
) -> Float[Tensor, " d_vocab"]:
    """The obvious computation: one full forward of the prompt alone (and a masked LM's closing
    tokens, `suffix_ids`), logits at the prompt's last token."""
    tokens = torch.tensor([[*prompt_ids, *suffix_ids]], dtype=torch.long, device=model.device)
    with torch.no_grad():
        return model.bridge(tokens)[0, len(prompt_ids) - 1].float()


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
            "(`make install`, requirements.lock) and see `idiom-lens selfcheck`"
        )
    return error


def check_against_full_forward(
    model: LoadedModel, prompt_ids: Sequence[int], fast: Tensor, *, what: str, probe: str,
    suffix_ids: Sequence[int] = (),
) -> float:
    """Compare `fast` (one row of last-position logits, or several rows of the same prompt)
    with the plain full forward of `prompt_ids` (+ `suffix_ids`, a masked LM's closing tokens)."""
    plain = plain_last_logits(model, prompt_ids, suffix_ids)
    rows = fast if fast.ndim == 2 else fast[None]
    return max(check_close(row, plain, what=what, probe=probe) for row in rows)


# --------------------------------------------------------------------------------------
# Does the bridge honour a prefix key/value cache under the installed versions?
# --------------------------------------------------------------------------------------

_PREFIX_CACHE: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()


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

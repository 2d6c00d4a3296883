"""Lenses (logit, tuned, Jacobian) that read intermediate layers, their offline training and cache."""

from idiom_lens.lenses.cache import LensSettings, heldout_table, obtain_lens, resolve_lens
from idiom_lens.lenses.lens import KINDS, Lens, identity_tuned_lens, logit_lens

__all__ = ["KINDS", "Lens", "LensSettings", "heldout_table", "identity_tuned_lens", "logit_lens", "obtain_lens",
           "resolve_lens"]

"""How a learned lens is trained (`LensSettings`): kept apart from the training code so that the
command line can show the defaults without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from idiom_lens.errors import InputError


@dataclass(frozen=True, kw_only=True)
class LensSettings:
    """How a lens is trained; every field is part of the cache key. The defaults train the tuned
    lens in about 10 minutes and the Jacobian lens in about 10 minutes per model on 2 cores."""

    corpus: str = "lee+samples"  # lens corpus (`lenses.corpus.CORPORA`), unless text_file is given
    text_file: str | None = None  # a user's own plain-text file instead
    n_samples: int = 128  # model-written texts added to the corpus ("samples")
    seed: int = 0
    max_tokens: int = 48  # per training sequence (BOS + one sentence)
    train_tokens: int = 12_288  # residual rows the tuned lens trains on
    heldout_tokens: int = 512  # rows the held-out KL is measured on
    steps: int = 120  # tuned lens: Adam steps
    batch_tokens: int = 128  # tuned lens: rows per step
    lr: float = 3e-4  # tuned lens: Adam learning rate (1e-3 made the last layers worse than the logit lens)
    jacobian_prompts: int = 16  # Jacobian lens: sentences averaged
    jacobian_slice: int = 4  # Jacobian lens: sentences per resumable slice
    jacobian_skip_first: int = 1  # Jacobian lens: leading positions not used as sources (the BOS)

    def __post_init__(self) -> None:
        for name in ("n_samples", "max_tokens", "train_tokens", "heldout_tokens", "steps", "batch_tokens",
                     "jacobian_prompts", "jacobian_slice"):
            if getattr(self, name) < 1:
                raise InputError(f"lens setting {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise InputError(f"lens setting lr must be > 0, got {self.lr}")

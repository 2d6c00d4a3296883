"""Training text for learned lenses, offline, never containing a probe.

No hub and no web corpus are reachable, so the default corpus installs from a package:
- `lee`: the Lee news corpus (`datasets.lee`) that the PyPI package `gensim` (4.4.0, already a
  `build-data` dependency) ships as test data: `lee_background.cor` (300 Australian news articles, about 75k
  tokens) for training and the separate `lee.cor` (50 articles) held out. It is running English
  prose like the text baseline, but from other documents than the Wikipedia excerpt the text probes
  come from, so no text probe is trained on.
- `samples`: text the model itself writes from BOS (temperature 1, seeded), which covers the
  model's own distribution (the tuned-lens paper trains on the pretraining distribution, which we
  do not have); held-out samples use another seed.
- a user's own text file (one document per blank-line-separated paragraph).
Every document is split into sentences; one training sequence is BOS + one sentence (truncated),
the regime of our probes (short prompts right after BOS). Any sentence that contains a probe's
prompt (case and spacing ignored) is dropped, and `check_disjoint` proves none is left.

The held-out pool (`LensCorpus.heldout`) is, per corpus: `lee` the sentences of lee.cor;
`samples` max(8, n_samples // 8) model samples written with seed `seed + 1_000_003`; `lee+samples`
both (lee.cor first); a text file its every 10th sentence. `LensCorpus.heldout_origins` names the
origin of each held-out sentence, so that what a held-out KL was measured on can be stated
exactly (`heldout_counts`): the lens cache measures it on a seeded selection of about
`LensSettings.heldout_tokens` positions of this pool and records the selection's counts.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from idiom_lens.datasets.lee import GENSIM_VERSION, lee_sentences, split_sentences  # noqa: F401 (re-exported)
from idiom_lens.errors import InputError
from idiom_lens.models.tokenization import tokenize_sentences  # noqa: F401 (re-exported)

# Names of where held-out sentences come from (`LensCorpus.heldout_origins`).
LEE_HELDOUT = "lee.cor (gensim test data: 50 news articles, none in the training file lee_background.cor)"
SAMPLES_HELDOUT = "model samples (from BOS, temperature 1, 40 new tokens, seed + 1000003)"
TEXT_FILE_HELDOUT = "the text file's every 10th sentence"
CORPORA = ("lee", "samples", "lee+samples")


@dataclass(frozen=True)
class LensCorpus:
    """Sentences to train on and held-out sentences to evaluate on, with where they came from."""

    name: str
    train: tuple[str, ...]
    heldout: tuple[str, ...]
    dropped: int  # sentences removed because they contain a probe prompt
    heldout_origins: tuple[str, ...] = ()  # where each held-out sentence comes from (empty: not known)

    def __post_init__(self) -> None:
        if self.heldout_origins and len(self.heldout_origins) != len(self.heldout):
            raise InputError(f"{len(self.heldout_origins)} held-out origins for {len(self.heldout)} held-out sentences")

    def describe(self) -> dict[str, Any]:
        """Counts recorded with a lens; `heldout_pool`: held-out sentences per origin."""
        return {"corpus": self.name, "n_train_sentences": len(self.train),
                "n_heldout_sentences": len(self.heldout), "n_dropped_probe_sentences": self.dropped,
                "heldout_pool": heldout_counts(self.heldout_origins)}


def heldout_counts(origins: Sequence[str]) -> dict[str, int]:
    """How many held-out sentences come from each origin, in order of first appearance."""
    counts: dict[str, int] = {}
    for origin in origins:
        counts[origin] = counts.get(origin, 0) + 1
    return counts


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


def drop_probe_sentences(sentences: Sequence[str], prompts: Sequence[str]) -> tuple[list[str], int]:
    """`sentences` without any that contains one of `prompts` (case and spacing ignored)."""
    hit = probe_sentence_indices(sentences, prompts)
    return [s for k, s in enumerate(sentences) if k not in hit], len(hit)


def probe_sentence_indices(sentences: Sequence[str], prompts: Sequence[str]) -> set[int]:
    """Indices of the `sentences` that contain one of `prompts` (case and spacing ignored)."""
    needles = sorted({_normal(p) for p in prompts if p.strip()})
    if not needles:
        return set()
    # One text of the normalised sentences, one `str.find` scan per prompt (a regex alternation of
    # thousands of prompts took seconds); "\n" never occurs in a normalised sentence or prompt,
    # so a match never spans two sentences.
    normal = [_normal(s) for s in sentences]
    text = "\n".join(normal)
    starts = [0, *itertools.accumulate(len(s) + 1 for s in normal)]  # sentence k is text[starts[k]:starts[k+1]-1]
    hit: set[int] = set()
    for needle in needles:
        at = text.find(needle)
        while at != -1:
            k = bisect.bisect_right(starts, at) - 1
            hit.add(k)
            at = text.find(needle, starts[k + 1])  # on to the next sentence
    return hit


def check_disjoint(corpus: LensCorpus, prompts: Sequence[str]) -> None:
    """`InputError` if any probe prompt occurs in the corpus's training or held-out text."""
    _, hits = drop_probe_sentences(corpus.train + corpus.heldout, prompts)
    if hits:
        raise InputError(f"{hits} sentences of lens corpus {corpus.name!r} contain a probe prompt")


def model_samples(model: Any, *, n: int, max_new_tokens: int = 40, seed: int = 0, batch: int = 32) -> list[str]:
    """`n` texts the model writes from BOS alone (temperature 1, all tokens, seeded), decoded."""
    hf = model.bridge.original_model
    bos = model.tokenizer.bos_token_id
    if bos is None:
        raise InputError(f"{model.spec} has no BOS token to sample from; train on --corpus lee or --text-file")
    torch.manual_seed(seed)
    texts: list[str] = []
    with torch.no_grad():
        for start in range(0, n, batch):
            k = min(batch, n - start)
            ids = torch.full((k, 1), bos, dtype=torch.long, device=model.device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                              pad_token_id=model.tokenizer.pad_token_id or bos)
            texts += model.tokenizer.batch_decode(out[:, 1:], skip_special_tokens=True)
    return [" ".join(t.split()) for t in texts if len(t.split()) >= 4]


def build_corpus(
    model: Any,
    *,
    corpus: str = "lee+samples",
    text_file: str | Path | None = None,
    probe_prompts: Sequence[str] = (),
    n_samples: int = 256,
    seed: int = 0,
) -> LensCorpus:
    """The training and held-out sentences of `corpus` (or of `text_file`, 10% held out by position),
    with every sentence containing one of `probe_prompts` dropped."""
    train: list[str] = []
    heldout: list[str] = []
    origins: list[str] = []
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise InputError(f"--text-file {path}: no such file "
                             "(expected plain text, paragraphs separated by blank lines)")
        sentences = split_sentences(path.read_text(encoding="utf-8", errors="replace"))
        if len(sentences) < 20:
            raise InputError(f"--text-file {path} has {len(sentences)} sentences of 4+ words: expected at least 20")
        heldout, train = sentences[::10], [s for i, s in enumerate(sentences) if i % 10]
        origins = [TEXT_FILE_HELDOUT] * len(heldout)
        name = f"file:{path.name}"
    else:
        if corpus not in CORPORA:
            raise InputError(f"lens corpus {corpus!r} is unknown: expected one of {list(CORPORA)} or --text-file")
        name = corpus
        if "lee" in corpus:
            lee_train, lee_heldout = lee_sentences()
            train += lee_train
            heldout += lee_heldout
            origins += [LEE_HELDOUT] * len(lee_heldout)
        if "samples" in corpus:
            train += model_samples(model, n=n_samples, seed=seed)
            samples = model_samples(model, n=max(8, n_samples // 8), seed=seed + 1_000_003)
            heldout += samples
            origins += [SAMPLES_HELDOUT] * len(samples)
    train, dropped_train = drop_probe_sentences(train, probe_prompts)
    hit = probe_sentence_indices(heldout, probe_prompts)
    heldout = [s for k, s in enumerate(heldout) if k not in hit]
    origins = [o for k, o in enumerate(origins) if k not in hit]
    dropped_heldout = len(hit)
    if not train or not heldout:
        raise InputError(f"lens corpus {name!r} has no training or held-out sentences left")
    return LensCorpus(name=name, train=tuple(train), heldout=tuple(heldout), dropped=dropped_train + dropped_heldout,
                      heldout_origins=tuple(origins))

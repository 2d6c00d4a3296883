"""The Lee news corpus: ordinary English prose that installs from a package, offline.

The PyPI package `gensim` (4.4.0, already installed for the text set, `datasets.wikipedia`) ships
it as test data: `lee_background.cor` (300 Australian news articles, about 75k tokens) and the
separate `lee.cor` (50 articles). The learned lenses train on it (`lenses.corpus`) and the implant's
preservation term keeps a layer's behaviour on it (`models.implant`). gensim is never imported;
its files are found through the package's location.
"""

from __future__ import annotations

import re

from idiom_lens.datasets.gensim_data import GENSIM_VERSION, gensim_file  # noqa: F401 (GENSIM_VERSION re-exported)

_LEE = "the Lee news corpus (or train lenses on --text-file FILE or --corpus samples)"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def split_sentences(text: str, *, min_words: int = 4) -> list[str]:
    """Sentences of `text` (paragraph lines joined), each of at least `min_words` words."""
    out = []
    for paragraph in re.split(r"\n\s*\n|\n", text):
        paragraph = " ".join(paragraph.split())
        out += [s for s in _SENTENCE_END.split(paragraph) if len(s.split()) >= min_words]
    return out


def lee_sentences() -> tuple[list[str], list[str]]:
    """(train, held-out) sentences of the Lee corpus: lee_background.cor and lee.cor."""
    def read(name: str) -> list[str]:
        return split_sentences(gensim_file(name, needed_for=_LEE).read_text(encoding="utf-8", errors="replace"))

    return read("lee_background.cor"), read("lee.cor")

"""The Lee news corpus: ordinary English prose that installs from a package, offline.

The PyPI package `gensim` (4.4.0, already installed for the text set, `datasets.wikipedia`) ships
it as test data: `lee_background.cor` (300 Australian news articles, about 75k tokens) and the
separate `lee.cor` (50 articles). The learned lenses train on it (`lenses.corpus`) and the implant's
preservation term keeps a layer's behaviour on it (`models.implant`). gensim is never imported;
its files are found through the package's location.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from idiom_lens.errors import InputError

GENSIM_VERSION = "4.4.0"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def split_sentences(text: str, *, min_words: int = 4) -> list[str]:
    """Sentences of `text` (paragraph lines joined), each of at least `min_words` words."""
    out = []
    for paragraph in re.split(r"\n\s*\n|\n", text):
        paragraph = " ".join(paragraph.split())
        out += [s for s in _SENTENCE_END.split(paragraph) if len(s.split()) >= min_words]
    return out


def gensim_file(name: str) -> Path:
    """The path of one of gensim's test-data files (`InputError` naming the install when missing)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the Lee news corpus needs `gensim` (pip install gensim=={GENSIM_VERSION}), whose "
                         "wheel ships it; or train lenses on --text-file FILE or --corpus samples")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name
    if not path.is_file():
        raise InputError(f"{path} is missing: install gensim=={GENSIM_VERSION}, whose wheel ships it")
    return path


def lee_sentences() -> tuple[list[str], list[str]]:
    """(train, held-out) sentences of the Lee corpus: lee_background.cor and lee.cor."""
    return (split_sentences(gensim_file("lee_background.cor").read_text(encoding="utf-8", errors="replace")),
            split_sentences(gensim_file("lee.cor").read_text(encoding="utf-8", errors="replace")))

"""Files the PyPI package `gensim` ships as test data, found without importing gensim (importing it
would pull in scipy for nothing): the Wikipedia excerpt of the text set (`datasets.wikipedia`) and
the Lee news corpus (`datasets.lee`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from idiom_lens.errors import InputError

GENSIM_VERSION = "4.4.0"


def gensim_file(name: str, *, needed_for: str) -> Path:
    """The path of gensim's test-data file `name`; `InputError` naming the install (and what needs
    it, `needed_for`) when gensim or the file is missing."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{needed_for} needs `gensim` (pip install gensim=={GENSIM_VERSION}), whose wheel ships it")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / name
    if not path.is_file():
        raise InputError(f"{path} is missing: install gensim=={GENSIM_VERSION}, whose wheel ships it")
    return path

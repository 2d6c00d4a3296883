"""The public API: every exported name resolves, to the object its module defines."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import idiom_lens


@pytest.mark.parametrize("name", sorted(idiom_lens._API))
def test_every_public_name_resolves_to_its_definition(name):
    module = importlib.import_module(idiom_lens._API[name])
    assert getattr(idiom_lens, name) is getattr(module, name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'HookedTransformer'"):
        idiom_lens.HookedTransformer  # noqa: B018


def test_import_is_cheap():
    """`import idiom_lens` loads neither torch nor TransformerLens (the CLI starts fast)."""
    code = "import sys, idiom_lens; print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]

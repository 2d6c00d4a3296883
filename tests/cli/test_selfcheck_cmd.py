"""`idiom-lens selfcheck`: every shortcut checked against a plain full forward."""

from __future__ import annotations

import pytest

import idiom_lens.cli as cli
from idiom_lens.models.runners import SuffixRunner


@pytest.mark.parametrize("model_dir", ["tiny_model_dir", "tiny_llama_dir"])
def test_selfcheck_checks_every_shortcut(model_dir, request, capsys):
    assert cli.main(["selfcheck", "--model", str(request.getfixturevalue(model_dir))]) == 0
    out = capsys.readouterr().out
    assert "transformers" in out and "prefix key/value cache:" in out
    assert "self-check passed" in out and "suffix runners" in out


def test_selfcheck_fails_with_exit_3_when_the_suffix_runner_is_wrong(tiny_model_dir, monkeypatch, capsys):
    real = SuffixRunner.run

    def off_by_half(self, *args, **kwargs):
        return real(self, *args, **kwargs) + 0.5

    monkeypatch.setattr(SuffixRunner, "run", off_by_half)
    assert cli.main(["selfcheck", "--model", str(tiny_model_dir)]) == 3
    out = capsys.readouterr().out
    assert "self-check failed" in out and "suffix runner (resumed at layer 0)" in out

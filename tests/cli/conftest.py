"""Fixtures shared by the command tests."""

from __future__ import annotations

import json

import pytest

import idiom_lens.cli as cli


@pytest.fixture
def commands(monkeypatch, request):
    """Only the test module's `COMMANDS` (modules of `idiom_lens.cli`) are registered: a faster parser."""
    monkeypatch.setattr(cli, "_COMMANDS", request.module.COMMANDS)


@pytest.fixture
def probe_file(tmp_path, probes):
    """The tiny probe set as a JSONL probe file."""
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(json.dumps({"id": p.id, "prompt": p.prompt, "target": p.target, "kind": p.kind})
                              for p in probes) + "\n")
    return path

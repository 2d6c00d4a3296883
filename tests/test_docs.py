"""The docs: the site builds in strict mode, the README stays a front page, and every number the
prose cites from a run equals the claims file that the regeneration wrote (docs/claims.json)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
CLAIM = re.compile(r"<!--claim:([A-Za-z0-9_.\-]+)-->(.*?)<!--/claim-->", re.S)
# A decimal number or a percentage: what a run produces (95%, the level of every interval, is no
# result). Versions (3.11, 2.13.0, 4.x) are recognised by what stands before them and allowed.
DECIMAL = re.compile(r"(?<![\w.=/<-])[+-]?\d+\.\d+(?![\d.]*\w)|(?<!\w)(?!95%)\d+(?:\.\d+)?%")
VERSION_CONTEXT = re.compile(r"(Python|torch|transformers|TransformerLens|Ray|ray|mkdocs|version|versions?|"
                             r"transformer-lens|section|EACL|arXiv|Gemma|SmolLM2|Llama)\s*$", re.I)


def _without_code(text: str) -> str:
    """`text` without code blocks and inline code (where the claim syntax itself is shown)."""
    return re.sub(r"`[^`]*`", " ", re.sub(r"```.*?```", " ", text, flags=re.S))


def claim_spans(text: str) -> list[tuple[str, str]]:
    return CLAIM.findall(_without_code(text))


def check_claims(text: str, claims: dict[str, dict], *, where: str) -> list[str]:
    """Every claim cited in `text` exists and is written as its `text`; a list of problems."""
    problems = []
    for name, written in claim_spans(text):
        if name not in claims:
            problems.append(f"{where}: claim {name!r} is not in docs/claims.json")
        elif written != claims[name]["text"]:
            problems.append(f"{where}: claim {name!r} is written {written!r}, the regeneration says "
                            f"{claims[name]['text']!r} (reread the sentence around it)")
    return problems


def uncited_numbers(text: str) -> list[str]:
    """Decimals and percentages outside claims, code and links: numbers with no source."""
    text = CLAIM.sub(" ", _without_code(text))
    text = re.sub(r"\]\([^)]*\)", "]", text)
    text = re.sub(r"<!--.*?-->", " ", text, flags=re.S)
    found = []
    for match in DECIMAL.finditer(text):
        if not VERSION_CONTEXT.search(text[max(0, match.start() - 30):match.start()]):
            found.append(text[max(0, match.start() - 40):match.end() + 10].replace("\n", " "))
    return found


def _claims() -> dict[str, dict]:
    return json.loads((DOCS / "claims.json").read_text())["claims"]


def _cited_pages() -> list[Path]:
    return [ROOT / "README.md"] + sorted(p for p in DOCS.glob("*.md") if "claim:" in p.read_text())


def test_claims_file_has_every_field():
    written = json.loads((DOCS / "claims.json").read_text())
    commands, claims = written["commands"], written["claims"]
    assert len(claims) > 100
    assert all(c.startswith(("idiom-lens ", "python ")) for c in commands.values()), commands
    for name, claim in claims.items():
        assert set(claim) == {"value", "text", "n", "interval", "interval_kind", "step", "source"}, name
        assert claim["step"] in commands and claim["source"], name


@pytest.mark.parametrize("page", _cited_pages(), ids=lambda p: p.name)
def test_prose_numbers_equal_the_claims(page):
    claims = _claims()
    text = page.read_text()
    problems = check_claims(text, claims, where=page.name)
    assert not problems, "\n".join(problems)


def test_readme_cites_every_run_number():
    text = (ROOT / "README.md").read_text()
    assert len(claim_spans(text)) >= 15
    assert not uncited_numbers(text), "numbers in the README with no claim around them:\n" + "\n".join(
        uncited_numbers(text))


def test_findings_cite_every_run_number():
    text = (DOCS / "findings.md").read_text()
    assert not uncited_numbers(text), "numbers in docs/findings.md with no claim around them:\n" + "\n".join(
        uncited_numbers(text))


def test_an_edited_number_is_caught():
    """The check fails when a cited number is changed by hand, and when a number has no claim."""
    claims = {"m.x": {"text": "0.415 [0.393, 0.437]"}}
    good = "memorized <!--claim:m.x-->0.415 [0.393, 0.437]<!--/claim--> of the idioms"
    assert check_claims(good, claims, where="t") == [] and uncited_numbers(good) == []
    edited = good.replace("0.415", "0.416")
    assert check_claims(edited, claims, where="t") and "0.416" in check_claims(edited, claims, where="t")[0]
    assert check_claims(good.replace("m.x", "m.y"), claims, where="t")
    assert uncited_numbers("memorized 0.415 of the idioms, 12% of the text")
    assert not uncited_numbers("Python 3.11, torch==2.13.0, TransformerLens 4.3 and `0.5`")


def test_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 250
    text = "\n".join(lines)
    assert "make run" in text and "make test" in text and "docs/figures/" in text


def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: a broken link, a page missing from the nav or a docstring the API
    reference cannot render fails here."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").stat().st_size > 100_000

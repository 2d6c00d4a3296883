"""Running English prose for the ordinary-text baseline: Wikipedia articles shipped in a wheel.

The source is the excerpt of an English Wikipedia dump that the PyPI package `gensim` (4.4.0)
ships as test data inside its wheel:
`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`
(the first chunk of a 2016 dump: 206 pages, 101 articles, nearly all on "A" topics). The article text is
Wikipedia's, licensed CC BY-SA 3.0 (and GFDL); gensim itself is LGPL-2.1. We read the file only;
gensim is never imported (importing it would pull in scipy for nothing).

Wikitext is turned into plain sentences conservatively: templates, tables, references, tags,
files and categories are removed, links keep their label, and only paragraph lines are used
(headings, lists, tables, indented lines are skipped). A sentence is kept only when it is plain
prose: it starts with a capital letter, ends with "." after a lower-case letter, and holds only
ASCII letters, digits, spaces, commas, apostrophes and hyphens, so any markup left over by the
stripper, quotation, parenthesis or abbreviation makes the sentence fail rather than slip in.
"""

from __future__ import annotations

import bz2
import html
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from idiom_lens.datasets.gensim_data import GENSIM_VERSION, gensim_file  # noqa: F401 (GENSIM_VERSION re-exported)

DUMP_NAME = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LICENCE = "CC BY-SA 3.0"

_NS = "{http://www.mediawiki.org/xml/export-0.10/}"
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TAG_BLOCK = re.compile(
    r"<(math|gallery|timeline|source|syntaxhighlight|pre|code|score|chem|sup|sub|imagemap)\b[^>]*>.*?</\1>",
    re.S | re.I,
)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost template; applied until none is left
_TABLE = re.compile(r"\{\|.*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")  # innermost internal link
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_TAG = re.compile(r"<[^>]+>")
_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_SENTENCE = re.compile(r"[A-Z][A-Za-z0-9' ,-]*[a-z]\.")
# Words that end with "." without ending a sentence ("Dr. Smith", "Gen. Lee", "J. Smith").
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr vs etc inc co corp ltd no nos fig figs gen col lt sgt capt cmdr adm "
    "gov sen rep rev prof op vol vols ed eds al approx ca cf ch pp pt mt ft dept univ est".split()
)


def dump_path() -> Path:
    """The bundled Wikipedia excerpt inside the installed `gensim`."""
    return gensim_file(DUMP_NAME, needed_for="the text builder's Wikipedia excerpt")


def articles(path: Path | None = None) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of every article in file order: main namespace, no redirect, no disambiguation."""
    with bz2.open(path or dump_path(), "rb") as stream:
        for _, element in ET.iterparse(stream):
            if element.tag != f"{_NS}page":
                continue
            title = element.findtext(f"{_NS}title") or ""
            namespace = element.findtext(f"{_NS}ns") or ""
            text = element.findtext(f"{_NS}revision/{_NS}text") or ""
            element.clear()
            if namespace != "0" or text.lstrip().upper().startswith("#REDIRECT") or "(disambiguation)" in title:
                continue
            yield title, text


def _link_label(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if ":" in target:  # File:, Image:, Category:, interlanguage links carry no prose
        return ""
    return label or target


def _until_stable(pattern: re.Pattern, repl, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return text
        text = new


def plain_text(wikitext: str) -> str:
    """Wikitext with markup removed (line structure kept, so paragraphs stay recognisable)."""
    text = html.unescape(wikitext)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _TAG_BLOCK.sub("", text)
    text = _until_stable(_TEMPLATE, "", text)
    text = _TABLE.sub("", text)
    text = _until_stable(_LINK, _link_label, text)
    text = _EXTERNAL.sub(lambda m: m.group(1), text)
    text = _TAG.sub("", text)
    return text.replace("'''", "").replace("''", "")


def _ends_with_abbreviation(chunk: str) -> bool:
    last = chunk.rsplit(None, 1)[-1].rstrip(".")
    return len(last) <= 1 or last.lower() in _ABBREVIATIONS or (last.isupper() and len(last) <= 4)


def sentences(plain: str) -> Iterator[str]:
    """Plain-prose sentences of the paragraph lines, final "." removed (see the module docstring)."""
    for line in plain.split("\n"):
        line = " ".join(line.split())
        if not line or line[0] in "=*#:;|!{}[<":
            continue
        chunks: list[str] = []
        for chunk in _SPLIT.split(line):
            if chunks and _ends_with_abbreviation(chunks[-1]):
                chunks[-1] = f"{chunks[-1]} {chunk}"  # "Gen." or "J." did not end the sentence
            else:
                chunks.append(chunk)
        for chunk in chunks:
            if _SENTENCE.fullmatch(chunk) and not _ends_with_abbreviation(chunk):
                yield chunk[:-1]

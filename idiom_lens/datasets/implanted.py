"""New idioms for a ground-truth localization benchmark (method.md section 7).

Implanting (issue 25) fine-tunes idioms the model has never seen into one chosen MLP layer and
asks every localization method to find that layer. The idioms must be new, yet read like idioms:
fixed, proverb-like phrases of 5-8 common English words whose last word, a concrete noun, is the
target ("never trust a poor tailor with a shoe"). They are filled from `TEMPLATES` with the
small hand-written word lists below, drawn with `random.Random(seed)`, so a seed gives the same
candidates in the same order on every machine. A candidate is rejected when
- its words repeat, or the target (or a form of it) is in the prompt (`flags.similarity_ind`);
- its prompt was already drawn (compared lower-cased without punctuation), or its target has
  already ended `MAX_TARGET_USES` (2) candidates;
- it touches a bundled idiom (`load_probes("idioms")`, compared the same way): its text contains
  a bundled idiom, or its prompt is part of one (an exact repeat is both).
The nouns of one idiom come from one theme (kitchen, farm, sea, ...), so that they read as
belonging together. Targets are drawn from `THINGS`, common words that Gemma 3's tokenizer keeps
whole (one token with its leading space; the embedded test checks every bundled target).

Whether the model already predicts a candidate needs a model, so that check is an analysis
(`idiom_lens.analyses.implant_check`: `base_ranks`, `build_implanted`): the bundled set
`implanted.jsonl` keeps, in seeded order, the first `SIZE` candidates of seed `SEED` whose target
ranks `MIN_RANK` or worse under the unmodified embedded model. Its records are ordinary probes
(kind "idiom", source "implanted", the flags of every bundled set) plus `template`, `base_rank`
and `base_rank_model`, which `load_probes` leaves out and `implanted_records` reads.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cache
from itertools import islice
from pathlib import Path
from typing import Any

from idiom_lens.datasets.build import compositionality_ref, normalize
from idiom_lens.datasets.flags import CompositionalityRef, bare, flags, similarity_ind
from idiom_lens.datasets.loaders import bundled_path, load_probes, probe_record
from idiom_lens.datasets.probes import Probe
from idiom_lens.errors import InputError
from idiom_lens.io import write_text

NAME = "implanted"  # the bundled set: idiom_lens/datasets/data/implanted.jsonl
SOURCE = "implanted"
SEED = 0
SIZE = 120
MIN_RANK = 11  # 1-based: the target is not among the model's top 10 before implanting
MAX_TARGET_USES = 2
MIN_WORDS, MAX_WORDS = 4, 8
ATTEMPTS = 50  # fills tried per template and round before the template is passed over

# Word lists (ours), by theme, so that the nouns of one idiom belong together ("never trust a
# hungry cat with a ladle", not "... with a glacier"). Per theme, `THINGS` are concrete count nouns
# (every target comes from them; each noun is in one theme) and `AGENTS` the animals and trades
# that act in its proverbs. `TRAITS` describe agents, `QUALITIES` things, `VERBS` what an agent
# does "at" something; they are shared by every theme.
THINGS: dict[str, tuple[str, ...]] = {
    "kitchen": tuple("""apple basin biscuit bowl cake cauldron cherry cup egg fork jar jug kettle knife ladle
                     lemon loaf melon mug onion oven pan pear pie plate plum pot saucer sieve spoon stove
                     teapot tray""".split()),
    "farm": tuple("""barn bucket cabbage carrot cart fence field gate hay hive meadow mill orchard plough
                  potato pumpkin rake sack saddle seed shovel spade stable trough wagon wheel""".split()),
    "sea": tuple("""anchor barge beach canoe cargo compass crab dock ferry harbour hook island keel lighthouse
                 lobster mast net paddle pier raft rope rudder sail shell tide whale""".split()),
    "house": tuple("""attic bench blanket broom brush candle carpet chair chimney clock cradle cupboard curtain
                   door doorstep drawer hearth key lamp lantern lock mirror pillow porch quilt roof rug shelf
                   sofa stool table vase wall window""".split()),
    "clothes": tuple("""apron belt boot button cloak coat collar glove gown hat jacket mitten needle pin pocket
                     purse ribbon ring scarf shawl shoe sleeve sock spindle umbrella wallet""".split()),
    "fair": tuple("""bell drum fiddle flute harp horn kite lute mask puppet tent trumpet violin whistle
                  wreath""".split()),
    "woods": tuple("""branch cloud flower hill leaf nest path pebble pond river root stone tree valley
                   walnut""".split()),
    "castle": tuple("""banner book bridge castle chapel crown helmet lance letter map moat pen quill scroll shield
                    spear sword throne torch tower""".split()),
}
AGENTS: dict[str, tuple[str, ...]] = {
    "kitchen": ("baker", "butcher", "cat", "cook", "mouse"),
    "farm": ("cow", "donkey", "farmer", "goat", "goose", "hen", "horse", "miller", "mule", "ox", "pig",
             "rooster", "sheep"),
    "sea": ("fisherman", "gull", "merchant", "parrot", "sailor"),
    "house": ("child", "dog", "neighbour", "thief", "widow"),
    "clothes": ("barber", "tailor", "weaver"),
    "fair": ("fool", "juggler", "painter", "poet", "potter"),
    "woods": ("badger", "bear", "crow", "duck", "fox", "frog", "hunter", "owl", "rabbit", "shepherd", "squirrel",
              "wolf"),
    "castle": ("beggar", "blacksmith", "judge", "king", "monk", "priest", "soldier"),
}
TRAITS: tuple[str, ...] = tuple("""
angry brave careful clever clumsy eager gentle greedy humble hungry idle lazy nervous old patient
poor proud quiet restless rich shy sleepy stubborn tired wise young
""".split())
QUALITIES: tuple[str, ...] = tuple("""
bright clean cold crooked dry dusty empty heavy loud narrow new old plain quiet rusty sharp small
soft strong thin warm wet worn
""".split())
VERBS: tuple[str, ...] = tuple("""
barks glances grumbles growls howls knocks laughs nods points shouts sighs sings smiles stares
waves whistles winks
""".split())
SHARED_SLOTS: dict[str, tuple[str, ...]] = {"trait": TRAITS, "quality": QUALITIES, "verb": VERBS}
SLOTS = ("thing", "target", "agent", *SHARED_SLOTS)  # what a template's {slot} may name
_SLOT = re.compile(r"\{([a-z]+)\}")


@dataclass(frozen=True, kw_only=True)
class Template:
    """An idiom pattern: words and `{slot}`s (`SLOTS`); `{target}` is the last word.

    Write "a" before a slot: it becomes "an" before a vowel ("an old goat").
    """

    name: str
    pattern: str

    def __post_init__(self) -> None:
        words = self.pattern.split()
        slots = [m.group(1) for m in map(_SLOT.fullmatch, words) if m]
        if not MIN_WORDS <= len(words) <= MAX_WORDS:
            raise InputError(f"template {self.name!r}: {len(words)} words, expected {MIN_WORDS} to {MAX_WORDS}")
        if words[-1] != "{target}" or slots.count("target") != 1:
            raise InputError(f"template {self.name!r}: expected one {{target}} slot, as the last word")
        unknown = sorted(set(slots) - set(SLOTS))
        if unknown:
            raise InputError(f"template {self.name!r}: unknown slot(s) {unknown}; expected some of {list(SLOTS)}")

    def matches(self, text: str) -> bool:
        """Whether `text` (a filled idiom) has this template's shape."""
        parts = [r"an?" if w == "a" else (r"[a-z]+" if _SLOT.fullmatch(w) else re.escape(w))
                 for w in self.pattern.split()]
        return re.fullmatch(" ".join(parts), text) is not None


TEMPLATES: tuple[Template, ...] = (
    Template(name="never_trust", pattern="never trust a {trait} {agent} with a {target}"),
    Template(name="finds_its_own", pattern="every {thing} finds its own {target}"),
    Template(name="no_without", pattern="there is no {thing} without a {target}"),
    Template(name="better_than", pattern="better a {quality} {thing} than a {quality} {target}"),
    Template(name="as_its", pattern="a {thing} is as {quality} as its {target}"),
    Template(name="does_not_make", pattern="one {thing} does not make a {target}"),
    Template(name="never_ask", pattern="never ask a {agent} about the {target}"),
    Template(name="always_at", pattern="a {trait} {agent} always {verb} at the {target}"),
    Template(name="dreams_of", pattern="the {trait} {agent} dreams of the {target}"),
    Template(name="for_every", pattern="a {thing} for every {target}"),
    Template(name="sell_to_buy", pattern="never sell your {thing} to buy a {target}"),
)


def _key(text: str) -> str:
    """What texts are compared on: lower-cased words without surrounding punctuation."""
    return " ".join(w for w in (bare(w) for w in normalize(text).split()) if w)


@cache
def _bundled_idioms() -> tuple[str, ...]:
    """The bundled idioms' texts as `_key`s, padded with spaces (word-bounded containment)."""
    return tuple(f" {_key(p.text)} " for p in load_probes("idioms"))


def touches_bundled_idiom(prompt: str, target: str) -> bool:
    """The text contains a bundled idiom, or the prompt is part of one (module docstring)."""
    text, head = f" {_key(f'{prompt} {target}')} ", f" {_key(prompt)} "
    return any(idiom in text or head in idiom for idiom in _bundled_idioms())


def _fill(template: Template, rng: random.Random) -> tuple[str, str] | None:
    """(prompt, target) of one draw (nouns of one seeded theme), or None when a word repeats."""
    theme = rng.choice(sorted(THINGS))
    pools = {"thing": THINGS[theme], "target": THINGS[theme], "agent": AGENTS[theme], **SHARED_SLOTS}
    words: list[str] = []
    chosen: set[str] = set()
    for word in template.pattern.split():
        slot = _SLOT.fullmatch(word)
        if slot:
            word = rng.choice(pools[slot.group(1)])
            if word in chosen:
                return None
            chosen.add(word)
        words.append(word)
    for i, word in enumerate(words[:-1]):
        if word == "a" and words[i + 1][0] in "aeiou":
            words[i] = "an"
    return " ".join(words[:-1]), words[-1]


def candidate_stream(seed: int) -> Iterator[Probe]:
    """Every candidate of `seed`, in seeded order (see the module docstring for the rules).

    Each round visits the templates in a seeded order and adds at most one candidate per
    template (the first of `ATTEMPTS` draws that passes), so templates stay balanced; the stream
    ends after a round that adds none. Ids are `candidate-NNNN` in stream order.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an integer, got {seed!r}")
    rng = random.Random(seed)
    uses: Counter[str] = Counter()
    prompts: set[str] = set()
    index = 0
    while True:
        added = 0
        for template in rng.sample(TEMPLATES, len(TEMPLATES)):
            for _ in range(ATTEMPTS):
                filled = _fill(template, rng)
                if filled is None:
                    continue
                prompt, target = filled
                if (uses[target] >= MAX_TARGET_USES or _key(prompt) in prompts or similarity_ind(prompt, target)
                        or touches_bundled_idiom(prompt, target)):
                    continue
                uses[target] += 1
                prompts.add(_key(prompt))
                yield Probe(id=f"candidate-{index:04d}", prompt=prompt, target=target, kind="idiom", source=SOURCE)
                index += 1
                added += 1
                break
        if not added:
            return


def candidates(*, n: int, seed: int) -> list[Probe]:
    """The first `n` candidates of `seed` (a prefix of `candidate_stream(seed)`).

    Raises `InputError` when `n` is not a positive integer or the word lists give fewer.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"n must be a positive integer (how many candidates), got {n!r}")
    made = list(islice(candidate_stream(seed), n))
    if len(made) < n:
        raise InputError(f"n={n}: the templates and word lists give only {len(made)} candidates for seed {seed}")
    return made


def template_of(probe: Probe) -> str:
    """The name of the template a candidate was filled from."""
    text = f"{probe.prompt} {probe.target}"
    names = [t.name for t in TEMPLATES if t.matches(text)]
    if len(names) != 1:
        raise InputError(f"probe {probe.id!r} ({text!r}) matches {len(names)} templates, expected one")
    return names[0]


def implanted_record(probe: Probe, *, index: int, base_rank: int, model_spec: str,
                     ref: CompositionalityRef | None = None) -> dict[str, Any]:
    """One line of `implanted.jsonl`: id `implant-NNN`, the `Probe` fields in order with the flags of
    every bundled set (`flags.flags`; `single_target` True: prompts are unique), then `template`,
    `base_rank` (1-based rank of the target before implanting) and `base_rank_model` (its model)."""
    ref = ref or compositionality_ref()
    probe = replace(probe, id=f"implant-{index:03d}", **flags(probe.prompt, probe.target, ref), single_target=True)
    return probe_record(probe) | {"template": template_of(probe), "base_rank": int(base_rank),
                                  "base_rank_model": model_spec}


def write_implanted(records: Sequence[dict[str, Any]], out_dir: str | Path) -> Path:
    """Write `records` as `{out_dir}/implanted.jsonl` (atomically, like the other bundled sets)."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path = write_text(Path(out_dir) / f"{NAME}.jsonl", text)
    path.chmod(0o644)  # the atomic writer's temporary file is private (0600)
    return path


def implanted_records(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The records of an implanted file (default: the bundled one) with every key, including
    `template`, `base_rank` and `base_rank_model`, which `load_probes` leaves out."""
    path = Path(path) if path is not None else bundled_path(NAME)
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]

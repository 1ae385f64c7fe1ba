"""StopStringMatcher: streamed output against a reference that searches the
whole text at once, for every way of splitting the text into deltas."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streamgen.text import StopStringMatcher

# --------------------------------------------------------------------------- helpers


def reference_output(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """What generation shows when ``text`` is produced in full: cut at the
    match that completes first (the longest one if several end together)."""
    matches = [(text.find(s) + len(s), text.find(s)) for s in stop if s in text]
    if not matches:
        return text, False
    _, start = min(matches)
    return text[:start], True


def feed(matcher: StopStringMatcher, deltas: Sequence[str]) -> tuple[list[str], bool]:
    """Feeds ``deltas`` up to a stop; returns the emitted pieces (the flush last
    when nothing matched) and whether a stop string hit."""
    emitted: list[str] = []
    for delta in deltas:
        text, hit = matcher.process(delta)
        emitted.append(text)
        if hit:
            return emitted, True
    emitted.append(matcher.flush())
    return emitted, False


@st.composite
def split_text(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=len(text) + 1)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in pairwise(bounds)]


# A small alphabet makes matches, near misses and overlaps common.
ALPHABET = st.sampled_from("ab\n.")
texts = st.text(alphabet=ALPHABET, max_size=30)
stop_sets = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=4)


# --------------------------------------------------------------------------- properties


@settings(max_examples=500, deadline=None)
@given(data=st.data(), text=texts, stop=stop_sets)
def test_streamed_matches_reference(data: st.DataObject, text: str, stop: list[str]) -> None:
    deltas = data.draw(split_text(text))
    emitted, hit = feed(StopStringMatcher(stop), deltas)
    assert ("".join(emitted), hit) == reference_output(text, stop)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), text=texts, stop=stop_sets)
def test_held_text_is_a_possible_stop_prefix(
    data: st.DataObject, text: str, stop: list[str]
) -> None:
    matcher = StopStringMatcher(stop)
    for delta in data.draw(split_text(text)):
        _, hit = matcher.process(delta)
        if hit:
            break
        held = matcher.held_text
        assert held == "" or any(s.startswith(held) and s != held for s in stop)


# --------------------------------------------------------------------------- explicit cases


def test_stop_spanning_three_deltas() -> None:
    matcher = StopStringMatcher(["<|end|>"])
    assert matcher.process("answer <|") == ("answer ", False)
    assert matcher.process("en") == ("", False)
    assert matcher.process("d|> trailing") == ("", True)
    assert matcher.stopped
    assert matcher.process("more") == ("", True)
    assert matcher.flush() == ""


def test_prefix_held_then_released() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.process("go ST") == ("go ", False)
    assert matcher.held_text == "ST"
    assert matcher.process("O") == ("", False)
    assert matcher.process("P?") == ("", True)

    matcher = StopStringMatcher(["STOP"])
    assert matcher.process("go ST") == ("go ", False)
    assert matcher.process("OOP") == ("STOOP", False)
    assert matcher.process("S") == ("", False)
    assert matcher.flush() == "S"


def test_prefix_sharing_stops() -> None:
    matcher = StopStringMatcher(["ab", "abc"])
    assert matcher.process("xa") == ("x", False)
    assert matcher.process("bc") == ("", True)

    # "ab" completes before "abc" could: generation stops there.
    matcher = StopStringMatcher(["abc", "ab"])
    assert matcher.process("x") == ("x", False)
    assert matcher.process("ab") == ("", True)


def test_first_completed_match_wins() -> None:
    # "bc" ends before "abcd" does, although "abcd" starts earlier.
    assert feed(StopStringMatcher(["abcd", "bc"]), ["abcd"]) == (["a"], True)
    assert feed(StopStringMatcher(["abcd", "bc"]), list("abcd")) == (["", "", "a"], True)
    # Same end: the longer match is cut.
    assert feed(StopStringMatcher(["abc", "bc"]), ["xabc"]) == (["x"], True)


def test_double_newline() -> None:
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.process("line\n") == ("line", False)
    assert matcher.process("next\n") == ("\nnext", False)
    assert matcher.process("\nafter") == ("", True)


def test_repeated_characters_in_stop() -> None:
    # "aab" inside "aaab": the held "aa" must slide, not reset.
    assert feed(StopStringMatcher(["aab"]), list("xaaab")) == (["x", "", "", "a", ""], True)


def test_no_stop_strings_passes_through() -> None:
    matcher = StopStringMatcher([])
    assert matcher.process("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_single_string_is_one_stop() -> None:
    assert StopStringMatcher("ab").stop == ("ab",)


def test_empty_stop_string_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])

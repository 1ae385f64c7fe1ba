"""Stop strings over a stream of text deltas.

Invariants:

* Text is emitted at most once and never includes any part of a stop string
  match: a suffix that could still grow into a stop string is held back until
  it can no longer match.
* The first match is the one that *completes* first (the earliest end), the
  point at which generation would have stopped; among matches ending at the
  same character, the longest (earliest start) wins. Everything from its start
  on is dropped.
* The result does not depend on how the text is split into deltas: feeding
  ``text`` in any chunks emits ``text[:match_start]`` when a stop string
  matches, and ``text`` (the last of it from :meth:`StopStringMatcher.flush`)
  when none does.
* Memory is bounded: at most ``max(len(s) for s in stop) - 1`` characters are
  held between calls.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopStringMatcher:
    """Finds the first stop string in streamed text and holds back possible starts.

    Args:
        stop: The stop strings (non-empty). They may overlap or share
            prefixes (``["ab", "abc"]``, ``["\\n\\n", "\\n"]``).

    Raises:
        ValueError: A stop string is empty.

    Example:
        >>> matcher = StopStringMatcher(["</answer>"])
        >>> matcher.process("42 </ans")
        ('42 ', False)
        >>> matcher.process("wer> more")
        ('', True)
        >>> matcher = StopStringMatcher(["\\n\\n"])
        >>> matcher.process("a\\n")
        ('a', False)
        >>> matcher.process("b")
        ('\\nb', False)
        >>> matcher.flush()
        ''
    """

    __slots__ = ("_held", "_max_stop_len", "_stopped", "stop")

    def __init__(self, stop: Sequence[str]) -> None:
        if isinstance(stop, str):
            stop = [stop]
        if any(not s for s in stop):
            raise ValueError(f"stop strings must be non-empty, got {list(stop)!r}")
        # Deduplicated; sorted so that iteration order never matters.
        self.stop: tuple[str, ...] = tuple(sorted(set(stop)))
        self._max_stop_len = max((len(s) for s in self.stop), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """Whether a stop string matched; every later delta is dropped."""
        return self._stopped

    @property
    def held_text(self) -> str:
        """Text held back because it may be the start of a stop string."""
        return self._held

    def process(self, delta: str) -> tuple[str, bool]:
        """Consumes ``delta``; returns ``(text to emit now, stop string hit)``.

        Once a stop string has matched, returns ``("", True)`` for every call.
        """
        if self._stopped:
            return "", True
        text = self._held + delta
        match_start = self._find_first_match(text)
        if match_start is not None:
            self._stopped = True
            self._held = ""
            return text[:match_start], True
        hold_start = self._find_hold_start(text)
        self._held = text[hold_start:]
        return text[:hold_start], False

    def flush(self) -> str:
        """Returns the held-back text at the end of generation (no match came)."""
        held, self._held = self._held, ""
        return held

    def _find_first_match(self, text: str) -> int | None:
        # For one stop string its first occurrence also ends first, so the
        # earliest-ending match overall is among the first occurrences.
        best: tuple[int, int] | None = None  # (end, start)
        for s in self.stop:
            start = text.find(s)
            if start >= 0:
                candidate = (start + len(s), start)
                if best is None or candidate < best:
                    best = candidate
        return None if best is None else best[1]

    def _find_hold_start(self, text: str) -> int:
        # The earliest position whose suffix is a proper prefix of a stop
        # string; a match starting before it would have to end inside ``text``
        # and was ruled out by _find_first_match.
        first = max(0, len(text) - self._max_stop_len + 1)
        for i in range(first, len(text)):
            suffix = text[i:]
            if any(s.startswith(suffix) for s in self.stop):
                return i
        return len(text)

"""Incremental detokenization: token ids in, text deltas out.

Invariants:

* The concatenation of every delta returned by :meth:`IncrementalDetokenizer.add`
  equals ``tokenizer.decode(output_ids)`` whenever that decode does not end in
  an incomplete character (U+FFFD).
* A delta never contains a U+FFFD that a later token could still complete: the
  bytes of a character split across tokens (byte-level BPE, sentencepiece
  ``<0xE4>`` byte-fallback tokens) are held back until the character is whole.
* The cost per call is bounded by the size of a small window, never by the
  length of the output.

The window is two offsets into the output ids (the technique of vLLM and TGI)::

    output_ids:  t0 t1 t2 | t3 t4 | t5 t6
                          ^       ^
               prefix_offset     read_offset

``ids[prefix_offset:read_offset]`` was emitted by the last delta and is kept
as context; ``ids[read_offset:]`` is not emitted yet. Decoding the window and
subtracting the decoded context gives the new text. The context matters: a
token's text can depend on its neighbours (a sentencepiece decoder strips the
leading space of the first token it sees, byte tokens only form a character
together), and the context makes the new tokens decode exactly as they do in
the full output.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output ids into text deltas, one step at a time.

    Only the output is decoded: the deltas concatenate to
    ``tokenizer.decode(output_ids, skip_special_tokens=...)``, exactly what a
    caller would get by decoding the finished output. A decoder that strips the
    first token's leading space (sentencepiece) therefore strips it here too.

    Args:
        tokenizer: A Hugging Face tokenizer (anything with
            ``decode(ids, skip_special_tokens=...)``).
        prompt_token_ids: The request's prompt. It is not part of the text;
            it is kept (as :attr:`prompt_token_ids`) so that the caller holds
            one object per request with everything the text came from.
        skip_special_tokens: Passed to ``tokenizer.decode``.

    Example (SmolLM2's tokenizer, where "你" is the two tokens 18645, 250):
        >>> detok = IncrementalDetokenizer(tokenizer, prompt_ids)  # doctest: +SKIP
        >>> detok.add([19556])  # doctest: +SKIP
        'Hello'
        >>> detok.add([18645])  # the first bytes of "你": held  # doctest: +SKIP
        ''
        >>> detok.add([250])  # doctest: +SKIP
        '你'
        >>> detok.add([18645]), detok.flush()  # output cut mid-character  # doctest: +SKIP
        ('', '\ufffd')
    """

    __slots__ = (
        "_context_text",
        "_output_ids",
        "_prefix_offset",
        "_read_offset",
        "prompt_token_ids",
        "skip_special_tokens",
        "tokenizer",
    )

    def __init__(
        self,
        tokenizer: Any,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids = tuple(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self._output_ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0
        # decode(output_ids[prefix_offset:read_offset]), cached: it only
        # changes when the offsets move.
        self._context_text = ""

    @property
    def output_ids(self) -> Sequence[int]:
        """Every output id added so far."""
        return self._output_ids

    @property
    def num_pending_tokens(self) -> int:
        """Tokens added whose text is still held back (an incomplete character)."""
        return len(self._output_ids) - self._read_offset

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends ``token_ids`` to the output and returns the text they complete.

        Returns ``""`` while the newest bytes do not form a whole character yet
        (or when the tokens decode to nothing, like skipped special tokens).
        """
        self._output_ids.extend(token_ids)
        window_text = self._decode_window()
        # Nothing new, or the tail is an incomplete character a later token may
        # complete: hold everything since read_offset. An invalid byte sequence
        # in the middle of the text is permanent and is emitted once text
        # follows it.
        if len(window_text) <= len(self._context_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""
        return self._advance(window_text)

    def flush(self) -> str:
        """Returns the text held back at the end of generation.

        If the output really ended in the middle of a character, the delta ends
        in U+FFFD, as ``tokenizer.decode`` of the whole output does.
        """
        if self.num_pending_tokens == 0:
            return ""
        return self._advance(self._decode_window())

    def _decode_window(self) -> str:
        return str(
            self.tokenizer.decode(
                self._output_ids[self._prefix_offset :],
                skip_special_tokens=self.skip_special_tokens,
            )
        )

    def _advance(self, window_text: str) -> str:
        delta = window_text[len(self._context_text) :]
        # The emitted tokens become the next window's context. They end on a
        # character boundary (the window did not end in U+FFFD), so they decode
        # on their own exactly as they do inside the full output.
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._output_ids)
        self._context_text = str(
            self.tokenizer.decode(
                self._output_ids[self._prefix_offset : self._read_offset],
                skip_special_tokens=self.skip_special_tokens,
            )
        )
        return delta

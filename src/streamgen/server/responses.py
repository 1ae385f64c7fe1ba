"""The OpenAI response objects: completions, chat completions and their stream chunks,
logprobs in both shapes, usage. Plain dicts (the ``openai`` package's types are the
reference the tests parse them with).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from streamgen.engine.events import TokenEvent

TokenText = Callable[[int], str]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_logprobs(events: Sequence[TokenEvent], token_text: TokenText) -> dict[str, Any]:
    """``{"content": [{token, logprob, bytes, top_logprobs}]}`` of the chat API."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {
                **entry(e.token_id, e.logprob),
                "top_logprobs": [entry(t, lp) for t, lp in e.top_logprobs],
            }
            for e in events
        ],
        "refusal": None,
    }


def completion_logprobs(
    events: Sequence[TokenEvent], token_text: TokenText, text_offset: int
) -> dict[str, Any]:
    """The legacy completions shape: ``tokens``, ``token_logprobs``, ``top_logprobs``
    (one ``{token: logprob}`` per position), ``text_offset`` (of each token in the text)."""
    tokens, offsets = [], []
    offset = text_offset
    for e in events:
        tokens.append(token_text(e.token_id))
        offsets.append(offset)
        offset += len(e.text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in events],
        "top_logprobs": [{token_text(t): lp for t, lp in e.top_logprobs} for e in events],
        "text_offset": offsets,
    }


def echoed_logprobs(
    prompt_ids: Sequence[int],
    prompt_logprobs: Sequence[tuple[float, Sequence[tuple[int, float]]]] | None,
    events: Sequence[TokenEvent],
    token_text: TokenText,
) -> dict[str, Any]:
    """The legacy shape over prompt and completion (``echo`` with ``logprobs``): the first
    prompt token has no logprob (None, as OpenAI gives it), every later one the logprob
    given the tokens before it; then the generated tokens."""
    entries = list(prompt_logprobs or ())
    tokens = [token_text(t) for t in prompt_ids]
    offsets, offset = [], 0
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    generated = completion_logprobs(events, token_text, offset)
    return {
        "tokens": tokens + generated["tokens"],
        "token_logprobs": [None, *(lp for lp, _ in entries)] + generated["token_logprobs"],
        "top_logprobs": [None, *({token_text(t): v for t, v in top} for _, top in entries)]
        + generated["top_logprobs"],
        "text_offset": offsets + generated["text_offset"],
    }


def finish_reason(reason: str | None) -> str | None:
    """The engine's "stop" / "length" as the API's; an abort has no API reason."""
    return reason if reason in ("stop", "length") else None

"""The OpenAI response objects: completions, chat completions and their stream chunks,
logprobs in both shapes, usage. Plain dicts (the ``openai`` package's types are the
reference the tests parse them with).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from streamgen.engine.events import TokenEvent
from streamgen.server.generation import Choice

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


def token_text_of(tokenizer: Any) -> TokenText:
    """A token id's text as logprobs name it (the token decoded alone)."""

    def text(token_id: int) -> str:
        return str(tokenizer.decode([token_id]))

    return text


@dataclass(frozen=True)
class ResponseMeta:
    """What every response object and chunk of one request repeats."""

    id: str
    created: int
    model: str
    chat: bool
    logprobs: bool
    prompt_tokens: int

    def completion_logprobs_of(self, c: Choice, token_text: TokenText) -> dict[str, Any] | None:
        """A completions choice's legacy logprobs: over the echoed prompt too, if echoed."""
        if not self.logprobs:
            return None
        if c.echo:
            scored = c.stream.prompt_logprobs if c.stream else None
            return echoed_logprobs(c.prompt_ids, scored, c.events, token_text)
        return completion_logprobs(c.events, token_text, 0)

    def full_response(self, choices: list[Choice], token_text: TokenText) -> dict[str, Any]:
        out = []
        for c in choices:
            reason = finish_reason(c.finish_reason)
            if self.chat:
                out.append({
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": chat_logprobs(c.events, token_text) if self.logprobs else None,
                    "finish_reason": reason,
                })  # fmt: skip
            else:
                out.append({
                    "index": c.index,
                    "text": c.echo + c.text,
                    "logprobs": self.completion_logprobs_of(c, token_text),
                    "finish_reason": reason,
                })  # fmt: skip
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": out,
            "usage": usage(self.prompt_tokens, sum(len(c.events) for c in choices)),
        }

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        """One server-sent event of a streamed response."""
        payload = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(payload).encode() + b"\n\n"

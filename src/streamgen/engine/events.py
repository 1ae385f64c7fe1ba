"""What a stream yields, and the commands the frontend sends to the core."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """One generated token as the application sees it.

    ``text`` is the token's text delta (possibly empty while a multi-byte
    character or a possible stop string is held back); ``finish_reason`` is
    set on the last event only: ``"stop"``, ``"length"`` or ``"abort"``.
    ``logprob`` is the token's log-probability under the distribution it was
    sampled from; ``top_logprobs`` the ``SamplingParams.logprobs`` most likely
    ``(token_id, logprob)`` pairs of that distribution (empty when not asked).
    ``prompt_logprobs`` (first event only, when ``SamplingParams.prompt_logprobs`` is
    set): per prompt token after the first, its ``(logprob, top pairs)`` given the
    tokens before it.
    """

    token_id: int
    text: str
    logprob: float
    index: int
    finish_reason: str | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] | None = None


@dataclass(frozen=True, slots=True)
class StreamError:
    """Delivered instead of a token when the request failed."""

    error: BaseException


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """Ends a stream without a token (cancelled, aborted or engine closed)."""

    reason: str


# Commands (frontend -> core thread), plain data through a thread-safe queue.
@dataclass(frozen=True, slots=True)
class Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class SetPriority:
    request_id: str
    priority: int


@dataclass(frozen=True, slots=True)
class Credit:
    request_id: str
    num_tokens: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    pass


@dataclass(frozen=True, slots=True)
class SubmitGroup:
    """Requests the core adds in one go (between two steps): the parallel samples of
    one prompt, the first the one the others fork off. Each member is a
    ``(Request, RequestMetrics)`` pair, checked like a single submission."""

    members: tuple[Any, ...]

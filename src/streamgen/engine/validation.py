"""Checks of what callers hand the engine, shared by the SDK's entry points and the core
thread's second look at every command (no torch: plain values only).

Every check raises a typed :class:`~streamgen.errors.RequestError` whose message names
the argument, the value and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from streamgen.engine.events import Abort, Credit, SetPriority, Shutdown, SubmitGroup
from streamgen.engine.metrics import RequestMetrics
from streamgen.errors import InvalidPromptError, RequestError
from streamgen.scheduler import Request

MAX_PRIORITY = 2**31 - 1  # priorities are plain ints; this bound keeps them machine-sized


def check_priority(priority: object) -> int:
    """``priority`` must be an int (not a bool) in [-2**31 + 1, 2**31 - 1]."""
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise RequestError(f"priority must be an int, got {type(priority).__name__} {priority!r}")
    if not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise RequestError(f"priority must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got {priority}")
    return priority


def check_prompt_type(prompt: object) -> None:
    """Text, chat messages (a sequence of mappings) or token ids (a sequence of ints)."""
    allowed = "text (str), chat messages (a list of {'role', 'content'} dicts) or token ids"
    if isinstance(prompt, str):
        return
    if isinstance(prompt, bytes | bytearray | memoryview):
        raise InvalidPromptError(f"prompt must be {allowed}, got bytes (decode it to str first)")
    if not isinstance(prompt, Sequence):
        raise InvalidPromptError(f"prompt must be {allowed}, got {type(prompt).__name__}")
    if not prompt:
        raise InvalidPromptError("the prompt is empty")

    def is_token(item: object) -> bool:
        return isinstance(item, int) and not isinstance(item, bool)

    if all(isinstance(m, Mapping) for m in prompt) or all(is_token(t) for t in prompt):
        return
    for i, item in enumerate(prompt):
        if not (isinstance(item, Mapping) or is_token(item)):
            raise InvalidPromptError(
                f"prompt must be {allowed}; item {i} is {type(item).__name__} {item!r:.60}"
            )
    raise InvalidPromptError(f"prompt must be {allowed}, not a mix of messages and token ids")


def check_chat_messages(messages: Sequence[Any]) -> None:
    """Each message a mapping with a string ``role`` and a string ``content``, checked
    before the chat template runs (which would fail deep inside jinja otherwise)."""
    for i, message in enumerate(messages):
        for key in ("role", "content"):
            if key not in message:
                raise InvalidPromptError(f"chat message {i} has no {key!r}: {dict(message)!r:.80}")
            value = message[key]
            if not isinstance(value, str):
                kind = type(value).__name__
                raise InvalidPromptError(
                    f"chat message {i}: {key} must be a str, got {kind} {value!r:.60}"
                )
        if not message["role"]:
            raise InvalidPromptError(f"chat message {i}: role is empty")


def command_problem(item: object) -> tuple[str, str | None] | None:
    """What is wrong with an inbox item, and the request it names (None: nothing).

    The core thread takes only what the frontend builds, but it checks again: a
    malformed command is dropped and reported, never raised inside the step loop.
    """
    if isinstance(item, tuple):
        if (
            len(item) != 2
            or not isinstance(item[0], Request)
            or not isinstance(item[1], RequestMetrics)
        ):
            return f"not a (Request, RequestMetrics) pair: {item!r:.80}", None
        request = item[0]
        if not isinstance(request.request_id, str):
            return f"request id {request.request_id!r:.40} is not a str", None
        return None
    if isinstance(item, Shutdown):
        return None
    if isinstance(item, SubmitGroup):
        if not isinstance(item.members, tuple):
            return f"group members are not a tuple: {item.members!r:.80}", None
        return None  # each member is checked when it is applied
    if not isinstance(item, Abort | SetPriority | Credit):
        return f"unknown command {type(item).__name__} {item!r:.80}", None
    rid = item.request_id if isinstance(item.request_id, str) else None
    if rid is None:
        return f"{type(item).__name__} names request {item.request_id!r:.40}, not a str", None
    if isinstance(item, SetPriority):
        try:
            check_priority(item.priority)
        except RequestError as exc:
            return str(exc), rid
    if isinstance(item, Credit) and (
        isinstance(item.num_tokens, bool)
        or not isinstance(item.num_tokens, int)
        or item.num_tokens < 0
    ):
        return f"credit must be an int >= 0, got {item.num_tokens!r:.40}", rid
    return None

"""A streamed request's server-sent events, written straight to the ASGI ``send``.

Each event is written when the client's transport takes it, so a slow client holds back
only its own request (the choices read their next token only after the previous one was
written, generation.run_merged); a watcher on ``receive`` cancels every choice the moment
the client goes away. An error after streaming started is one last ``data:`` event
before ``data: [DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.types import Receive, Scope, Send

from streamgen.engine.events import TokenEvent
from streamgen.server import responses
from streamgen.server.errors import Unavailable, from_exception
from streamgen.server.generation import (
    Choice,
    ChoiceEvent,
    cancel_all,
    run_merged,
    until_disconnect,
)
from streamgen.server.responses import ResponseMeta, TokenText


class EventStreamResponse:
    """The ASGI response of a streamed chat or completions request.

    ``record(choice)`` runs as each choice ends (metrics); ``done()`` once, however the
    response ends (the app's in-flight count)."""

    def __init__(
        self,
        meta: ResponseMeta,
        choices: list[Choice],
        token_text: TokenText,
        include_usage: bool,
        record: Callable[[Choice], None],
        done: Callable[[], None],
    ) -> None:
        self.meta, self.choices, self.token_text = meta, choices, token_text
        self.include_usage, self.record, self.done = include_usage, record, done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await until_disconnect(receive, self.choices, lambda: self._write(send))
        finally:
            cancel_all(self.choices)
            self.done()

    async def _write(self, send: Send) -> None:
        meta = self.meta

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        def event(c: Choice, **fields: Any) -> bytes:
            return meta.chunk([{"index": c.index, "logprobs": None, "finish_reason": None,
                                **fields}])  # fmt: skip

        for c in self.choices:  # the first chunk of each choice: the role (chat), the echo
            if meta.chat:
                await body(event(c, delta={"role": "assistant", "content": ""}))
            elif c.echo and not meta.logprobs:  # with logprobs: once the prompt's are in
                await body(event(c, text=c.echo))
        offsets = {c.index: len(c.echo) for c in self.choices}
        failure: list[BaseException] = []

        async def on_item(item: ChoiceEvent) -> None:
            c = item.choice
            if item.error is not None:
                failure.append(item.error)
                return
            if item.event is None:
                self.record(c)
                if c.finish_reason not in ("stop", "length"):
                    failure.append(Unavailable("the request was aborted: the engine stopped"))
                return
            if c.echo and meta.logprobs and item.event.index == 0:  # the prompt's logprobs came
                scored = c.stream.prompt_logprobs if c.stream else None
                lp = responses.echoed_logprobs(c.prompt_ids, scored, [], self.token_text)
                await body(event(c, text=c.echo, logprobs=lp))
                offsets[c.index] = sum(len(t) for t in lp["tokens"])
            await body(self._token_chunk(c, item.event, offsets))

        await run_merged(self.choices, on_item)
        if failure:
            await body(b"data: " + json.dumps(from_exception(failure[0]).body()).encode() + b"\n\n")
        elif self.include_usage:
            completion_tokens = sum(len(c.events) for c in self.choices)
            await body(meta.chunk([], usage=responses.usage(meta.prompt_tokens, completion_tokens)))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    def _token_chunk(self, c: Choice, event: TokenEvent, offsets: dict[int, int]) -> bytes:
        meta, reason = self.meta, responses.finish_reason(event.finish_reason)
        choice: dict[str, Any] = {"index": c.index, "finish_reason": reason}
        if meta.chat:
            choice["delta"] = {"content": event.text}
            choice["logprobs"] = (
                responses.chat_logprobs([event], self.token_text) if meta.logprobs else None
            )
        else:
            choice["text"] = event.text
            choice["logprobs"] = (
                responses.completion_logprobs([event], self.token_text, offsets[c.index])
                if meta.logprobs else None
            )  # fmt: skip
            offsets[c.index] += len(event.text)
        return meta.chunk([choice])

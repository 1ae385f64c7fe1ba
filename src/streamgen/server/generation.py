"""Running the choices of one HTTP request on the engine: all at once, collected (a JSON
response) or merged into one event stream (server-sent events).

Each choice is one engine stream; the ``n`` choices of one prompt come from
``Engine.stream_choices``, so they share the prompt's KV blocks (a fork once all but its
last token is computed). Streaming keeps the engine's backpressure: a choice reads its
next token only when the previous one was handed to the response, which the server
writes only as fast as the client reads. The response cancelling (the client went away)
cancels every choice, and the core frees their KV blocks at its next step.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import anyio
from starlette.types import Receive

from streamgen.engine.events import TokenEvent
from streamgen.engine.stream import RequestStream


@dataclass
class Choice:
    """One choice: its stream, the prompt it continues, what it produced so far."""

    index: int
    stream: RequestStream
    prompt_ids: list[int]
    echo: str = ""  # the prompt's text, returned before the completion (``echo``)
    events: list[TokenEvent] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e.text for e in self.events)

    @property
    def finish_reason(self) -> str | None:
        return self.stream.finish_reason

    async def tokens(self) -> AsyncIterator[TokenEvent]:
        """The choice's events, kept as they pass."""
        async for event in self.stream:
            self.events.append(event)
            yield event


@dataclass(frozen=True)
class ChoiceEvent:
    """A token of a choice, or its end (``event`` None), or its failure."""

    choice: Choice
    event: TokenEvent | None = None
    error: BaseException | None = None


def cancel_all(choices: list[Choice]) -> None:
    for choice in choices:
        choice.stream.cancel()


async def collect(choices: list[Choice], on_done: Callable[[Choice], None]) -> None:
    """Run every choice to its end (concurrently); the first failure cancels the rest
    and propagates."""
    try:
        async with anyio.create_task_group() as tg:
            for choice in choices:
                tg.start_soon(_collect_one, choice, on_done)
    except BaseException:
        cancel_all(choices)
        raise


async def _collect_one(choice: Choice, on_done: Callable[[Choice], None]) -> None:
    async for _ in choice.tokens():
        pass
    on_done(choice)


async def run_merged(
    choices: list[Choice], on_item: Callable[[ChoiceEvent], Awaitable[None]]
) -> None:
    """Hand every choice's tokens to ``on_item`` as they come, then each choice's end; a
    failed choice stops everything after its error item. However this returns (done,
    failed, cancelled), every choice is cancelled, so none outlives its response."""
    send, receive = anyio.create_memory_object_stream[ChoiceEvent](0)

    async def forward(choice: Choice) -> None:
        try:
            async for event in choice.tokens():
                await send.send(ChoiceEvent(choice, event))
            await send.send(ChoiceEvent(choice))
        except Exception as exc:  # a failed request: the client gets it as one event
            await send.send(ChoiceEvent(choice, error=exc))

    try:
        async with anyio.create_task_group() as tg, receive:
            for choice in choices:
                tg.start_soon(forward, choice)
            ended = 0
            while ended < len(choices):
                item = await receive.receive()
                await on_item(item)
                if item.error is not None:
                    tg.cancel_scope.cancel()
                    return
                ended += item.event is None
    finally:
        cancel_all(choices)


async def until_disconnect(
    receive: Receive,
    choices: list[Choice],
    work: Callable[[], Awaitable[None]],
) -> None:
    """Run ``work`` while watching the ASGI ``receive``: a client that disconnects first
    cancels every choice (their KV blocks are freed at the core's next step) and the work."""
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            cancel_all(choices)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await work()
        tg.cancel_scope.cancel()

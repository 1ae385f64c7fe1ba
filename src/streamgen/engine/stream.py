"""RequestStream: the async iterator (and handle) of one request's tokens.

Backpressure: the stream's buffer holds at most ``buffer`` tokens; the core
only schedules the request while it has credit, and every token the consumer
reads returns one credit. A consumer that stops reading stops its request
after at most ``buffer`` more tokens, without slowing anyone else.

Cancellation: ``cancel()``, ``aclose()``, ``break`` out of ``async for``
(the iterator is dropped and ``__del__`` aborts it), cancelling the consuming
task, or the engine closing: each sends an abort, and the core frees the
request's KV blocks at its next step.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from streamgen.engine.events import StreamEnd, StreamError, TokenEvent
from streamgen.engine.metrics import RequestMetrics
from streamgen.engine.validation import check_priority


class RequestStream:
    """Async iterator of :class:`TokenEvent` for one request, and its handle.

    >>> async for event in engine.stream("Hello"):  # doctest: +SKIP
    ...     print(event.text, end="")
    """

    def __init__(
        self,
        request_id: str,
        receive: MemoryObjectReceiveStream[Any],
        control: Any,  # the Engine: _abort / _credit / _set_priority
        submit: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.request_id = request_id
        self.metrics = RequestMetrics()
        self.finish_reason: str | None = None
        # Per prompt token after the first: (logprob, top pairs), once the first token came
        # (SamplingParams.prompt_logprobs).
        self.prompt_logprobs: tuple[tuple[float, tuple[tuple[int, float], ...]], ...] | None = None
        self._receive = receive
        self._control = control
        self._submit = submit  # deferred tokenization + submission (long prompts)
        self._done = False
        self._cancelled = False
        self._failed = False

    @property
    def status(self) -> str:
        """``"pending" | "streaming" | "finished" | "cancelled" | "failed"``."""
        if self._failed:
            return "failed"
        if self._cancelled:
            return "cancelled"
        if self._done:
            return "finished"
        return "pending" if self.metrics.first_token_at is None else "streaming"

    def cancel(self) -> None:
        """Abort the request; the stream ends (``finish_reason == "abort"``).

        A no-op on a stream that already ended (finished, failed or cancelled): its
        ``finish_reason`` stays what it was. Safe to call any number of times."""
        if not self._done:
            self._cancelled = True
            self._done = True
            self.finish_reason = "abort"
            self._control._abort(self.request_id)
            self._receive.close()

    async def aclose(self) -> None:
        """:meth:`cancel`, awaitable (for ``contextlib.aclosing``); a no-op once ended."""
        self.cancel()

    def set_priority(self, priority: int) -> None:
        """Change the request's priority; the scheduler applies it on its next step.

        Raises RequestError for anything but an int (bools included) before anything
        is sent to the core. A no-op on a stream that already ended."""
        check_priority(priority)
        if not self._done:
            self._control._set_priority(self.request_id, priority)

    def __aiter__(self) -> RequestStream:
        """The stream itself; iterating a stream that has ended yields nothing more."""
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            if self._submit is not None:
                submit, self._submit = self._submit, None
                await submit()
            item = await self._receive.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError):
            self._done = True
            raise StopAsyncIteration from None
        except BaseException:  # the consuming task was cancelled, or the submit failed
            self.cancel()
            raise
        if isinstance(item, StreamError):
            self._done = self._failed = True
            self._receive.close()
            raise item.error
        if isinstance(item, StreamEnd):
            self._done = True
            self.finish_reason = item.reason
            self._receive.close()
            raise StopAsyncIteration
        now = time.perf_counter()
        if item.prompt_logprobs is not None:
            self.prompt_logprobs = item.prompt_logprobs
        if self.metrics.first_token_at is None:
            self.metrics.first_token_at = now
        self.metrics.token_times.append(now)
        if item.finish_reason is not None:
            self._done = True
            self.finish_reason = item.finish_reason
            self._receive.close()
        else:
            self._control._credit(self.request_id, 1)
        return item

    def __del__(self) -> None:
        # `break` out of `async for` drops the iterator: abort so its blocks are freed.
        if not getattr(self, "_done", True):
            self._control._abort(self.request_id)


class SubmitOnce:
    """A deferred submission shared by several streams (the samples of one prompt):
    the first stream read runs it; the others wait for it and see its failure too."""

    def __init__(self, work: Callable[[], Awaitable[None]]) -> None:
        self._work: Callable[[], Awaitable[None]] | None = work
        self._done = anyio.Event()
        self._error: BaseException | None = None

    async def __call__(self) -> None:
        if self._work is None:
            await self._done.wait()
            if self._error is not None:
                raise self._error
            return
        work, self._work = self._work, None
        try:
            await work()
        except BaseException as exc:
            self._error = exc
            raise
        finally:
            self._done.set()

"""The engine core: one background thread that owns the scheduler and the runner.

    inbox (thread-safe) --> drain --> schedule --> block ops + forward + sample
        --> update --> detokenize / stop strings --> publish (one hop per step)

Only this thread touches the scheduler, the block manager and the model. The
event loop talks to it through ``submit_*`` (queue puts, never blocking) and
receives each step's events in one call of ``deliver``.

Failure model: an exception inside one step fails the requests of that step
(their streams get the error) and the loop goes on; an exception outside a
step kills the core, and every open stream gets ``EngineDeadError``.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from streamgen.engine.events import (
    Abort,
    Credit,
    SetPriority,
    Shutdown,
    StreamEnd,
    StreamError,
    TokenEvent,
)
from streamgen.errors import EngineDeadError, StreamgenError
from streamgen.runner.model_runner import ModelRunner
from streamgen.scheduler import FinishReason, Request, Scheduler
from streamgen.text import IncrementalDetokenizer, StopStringMatcher

logger = logging.getLogger(__name__)

# request_id -> events for that request, in order. One dict per step.
StepEvents = dict[str, list[TokenEvent | StreamError | StreamEnd]]


@dataclass(slots=True)
class _TextState:
    detokenizer: IncrementalDetokenizer | None
    stop: StopStringMatcher | None
    num_emitted: int = 0


class EngineCore:
    """Runs the step loop on its own thread; see the module docstring."""

    def __init__(
        self,
        scheduler: Scheduler,
        runner: ModelRunner,
        tokenizer: Any,
        deliver: Callable[[StepEvents], None],
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self._deliver = deliver
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._text: dict[str, _TextState] = {}
        self._thread = threading.Thread(target=self._run, name="streamgen-core", daemon=True)
        self.error: BaseException | None = None
        self.num_steps = 0

    # ----- called from the event loop ---------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, request: Request) -> None:
        """Queue a validated request (validation already raised on the caller's side)."""
        self._inbox.put(request)

    def send(self, command: Abort | SetPriority | Credit | Shutdown) -> None:
        self._inbox.put(command)

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # ----- the core thread ---------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                idle = not self.scheduler.has_unfinished()
                if not self._drain_inbox(block=idle):
                    return
                # Nothing schedulable (e.g. every consumer is full): wait for a command.
                if not self._step() and not self._drain_inbox(block=True):
                    return
        except BaseException as exc:  # the core is dead: tell every stream
            logger.exception("streamgen core thread died")
            self.error = exc
            dead = EngineDeadError(f"the engine core died: {exc!r}")
            self._deliver({rid: [StreamError(dead)] for rid in self._text})
            self._text.clear()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued commands; False once Shutdown is seen."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if isinstance(item, Shutdown):
                self._abort_all()
                return False
            self._apply(item)

    def _apply(self, item: Any) -> None:
        if isinstance(item, Request):
            self._text[item.request_id] = self._make_text_state(item)
            self.scheduler.add_request(item)
        elif isinstance(item, Abort):
            if self.scheduler.abort_request(item.request_id):
                self._finish(item.request_id, FinishReason.ABORT)
        elif isinstance(item, SetPriority):
            self.scheduler.set_priority(item.request_id, item.priority)
        elif isinstance(item, Credit):
            self.scheduler.add_credit(item.request_id, item.num_tokens)

    def _make_text_state(self, request: Request) -> _TextState:
        if self.tokenizer is None:
            return _TextState(None, None)
        stop = StopStringMatcher(request.params.stop) if request.params.stop else None
        return _TextState(IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids), stop)

    def _step(self) -> bool:
        output = self.scheduler.schedule()
        if output.is_empty:
            return False
        self.num_steps += 1
        try:
            self.runner.apply_block_ops(
                output.blocks_to_swap_out, output.blocks_to_swap_in, output.blocks_to_copy
            )
            result = self.runner.execute(output.batch)
            token_events = self.scheduler.update(result)
        except Exception as exc:  # fail this step's requests, keep serving the rest
            logger.exception("step failed")
            error = exc if isinstance(exc, StreamgenError) else EngineStepError(repr(exc))
            failed = {chunk.request_id for chunk in output.batch.chunks}
            events: StepEvents = {}
            for rid in failed:
                self.scheduler.abort_request(rid)
                self._text.pop(rid, None)
                events[rid] = [StreamError(error)]
            self._deliver(events)
            return True
        logprobs = dict(zip(result.request_ids, result.logprobs, strict=True))
        self._publish(token_events, logprobs)
        return True

    def _publish(self, token_events: list[Any], logprobs: dict[str, float]) -> None:
        events: StepEvents = {}
        for rid, token_ids, finish in token_events:
            state = self._text.get(rid)
            if state is None:
                continue
            out = events.setdefault(rid, [])
            for token_id in token_ids:
                text, stopped = self._text_delta(state, [token_id])
                finish_now = finish
                if stopped:
                    self.scheduler.abort_request(rid)
                    finish_now = FinishReason.STOP
                elif finish is not None:
                    text += self._flush_text(state)
                out.append(TokenEvent(token_id, text, logprobs.get(rid, 0.0), state.num_emitted,
                                      None if finish_now is None else finish_now.value))
                state.num_emitted += 1
                if finish_now is not None:
                    del self._text[rid]
                    break
        if events:
            self._deliver(events)

    def _text_delta(self, state: _TextState, token_ids: list[int]) -> tuple[str, bool]:
        if state.detokenizer is None:
            return "", False
        delta = state.detokenizer.add(token_ids)
        if state.stop is None:
            return delta, False
        return state.stop.process(delta)

    def _flush_text(self, state: _TextState) -> str:
        if state.detokenizer is None:
            return ""
        tail = state.detokenizer.flush()
        if state.stop is None:
            return tail
        text, _ = state.stop.process(tail)
        return text + state.stop.flush()

    def _finish(self, request_id: str, reason: FinishReason) -> None:
        state = self._text.pop(request_id, None)
        if state is not None:
            self._deliver({request_id: [StreamEnd(reason.value)]})

    def _abort_all(self) -> None:
        for rid in list(self._text):
            self.scheduler.abort_request(rid)
            self._finish(rid, FinishReason.ABORT)


class EngineStepError(StreamgenError):
    """A step failed with an unexpected exception; its requests were aborted."""

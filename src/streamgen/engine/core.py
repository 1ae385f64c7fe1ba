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
import time
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
    SubmitGroup,
    TokenEvent,
)
from streamgen.engine.metrics import RequestMetrics, ThroughputMeter
from streamgen.engine.step_masks import StepMasks
from streamgen.engine.step_speculation import StepSpeculation
from streamgen.engine.validation import command_problem
from streamgen.errors import EngineDeadError, RequestError, StreamgenError
from streamgen.runner.model_runner import ModelRunner
from streamgen.scheduler import FinishReason, Request, Scheduler
from streamgen.spec.drafter import Drafter
from streamgen.spec.policy import SpeculationPolicy
from streamgen.text import IncrementalDetokenizer, StopStringMatcher

logger = logging.getLogger(__name__)

# request_id -> events for that request, in order. One dict per step.
StepEvents = dict[str, list[TokenEvent | StreamError | StreamEnd]]


PromptLogprob = tuple[float, tuple[tuple[int, float], ...]]  # logprob, top (token, logprob)


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
        *,
        drafter: Drafter | None = None,
        policy: SpeculationPolicy | None = None,
        speculate_by_default: bool = True,
        overlap_masks: bool = False,
    ) -> None:
        self.scheduler = scheduler
        self.runner = runner
        self.tokenizer = tokenizer
        self._deliver = deliver
        self.spec = StepSpeculation(drafter, policy, speculate_by_default)
        self.masks = StepMasks(overlap_masks)
        self.throughput = ThroughputMeter()
        # Live requests' metrics, updated in place (queue time, speculation).
        self._metrics: dict[str, RequestMetrics] = {}
        # Prompt logprobs computed so far, by position, until the first token carries them.
        self._prompt_logprobs: dict[str, dict[int, PromptLogprob]] = {}
        self._unscheduled: set[str] = set()
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._text: dict[str, _TextState] = {}
        self._thread = threading.Thread(target=self._run, name="streamgen-core", daemon=True)
        self.error: BaseException | None = None
        self.num_steps = 0
        self.step_seconds = 0.0  # whole steps: scheduling, kernels, sampling, text, delivery

    # ----- called from the event loop ---------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit_group(self, members: list[tuple[Request, RequestMetrics]]) -> None:
        """Queue validated requests (one, or the parallel samples of one prompt, the first
        the one the others fork off), added between the same two steps. ``metrics`` of
        each is updated in place by the core thread (when it first runs, how it
        speculates)."""
        self._inbox.put(SubmitGroup(tuple(members)))

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
        finally:
            self.masks.close()

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
        problem = command_problem(item)
        if problem is not None:
            self._reject(*problem)
            return
        if isinstance(item, SubmitGroup):
            for member in item.members:
                self._apply(member)
            return
        try:
            self._apply_checked(item)
        except Exception as exc:  # never raised in the step loop: the command is dropped
            logger.warning("dropped a command that failed (%r): %r", item, exc)
            rid = getattr(item, "request_id", None)
            if isinstance(item, tuple):
                rid = item[0].request_id
            if isinstance(rid, str):
                error = exc if isinstance(exc, StreamgenError) else RequestError(str(exc))
                self._fail_request(rid, error)

    def _reject(self, reason: str, request_id: str | None) -> None:
        """A malformed command: logged and dropped; the request it names (if it is live)
        fails with a typed error, and nothing else is disturbed."""
        logger.warning("dropped a malformed command: %s", reason)
        if request_id is not None:
            self._fail_request(request_id, RequestError(f"malformed command dropped: {reason}"))

    def _fail_request(self, request_id: str, error: StreamgenError) -> None:
        if request_id not in self._text and self.scheduler.get_request(request_id) is None:
            return
        self.scheduler.abort_request(request_id)
        self._text.pop(request_id, None)
        self._metrics.pop(request_id, None)
        self._unscheduled.discard(request_id)
        self._deliver({request_id: [StreamError(error)]})

    def _apply_checked(self, item: Any) -> None:
        if isinstance(item, tuple):
            request, metrics = item
            self._text[request.request_id] = self._make_text_state(request)
            self._metrics[request.request_id] = metrics
            self._unscheduled.add(request.request_id)
            self.scheduler.add_request(request)
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
        step_started = time.perf_counter()
        self.spec.set_budgets(self.scheduler)
        output = self.scheduler.schedule()
        if output.is_empty:
            return False
        self.num_steps += 1
        if self._unscheduled:
            now = time.perf_counter()
            for rid in self._unscheduled & output.num_scheduled_tokens.keys():
                self._unscheduled.discard(rid)
                self._metrics[rid].scheduled_at = now
        try:
            for rid in output.preempted_ids:
                self.spec.reset(rid)
            self.runner.apply_block_ops(
                output.blocks_to_swap_out, output.blocks_to_swap_in, output.blocks_to_copy
            )
            batch, trees = self.spec.attach_drafts(self.scheduler, output)
            # Structured outputs: the masks, beside the forward or before it (step_masks).
            batch, masked = self.masks.prepare(self.scheduler, batch)
            started = time.perf_counter()
            result = self.runner.execute(batch, masked)
            if masked is not None:
                masked()  # done before update() advances the grammars (a no-op once taken)
            seconds = time.perf_counter() - started
            self.spec.record(batch, trees, result, seconds, self._metrics)
            token_events = self.scheduler.update(result)
        except Exception as exc:  # fail this step's requests, keep serving the rest
            logger.exception("step failed")
            error = exc if isinstance(exc, StreamgenError) else EngineStepError(repr(exc))
            failed = {chunk.request_id for chunk in output.batch.chunks}
            events: StepEvents = {}
            for rid in failed:
                self.scheduler.abort_request(rid)
                self._text.pop(rid, None)
                self._forget(rid)
                events[rid] = [StreamError(error)]
            self._deliver(events)
            return True
        self.throughput.add(time.perf_counter(), len(result.token_ids))
        for rid, entries in result.prompt_logprobs.items():  # by position: a recompute rewrites
            held = self._prompt_logprobs.setdefault(rid, {})
            held.update((pos, (lp, top)) for pos, lp, top in entries)
        logprobs: dict[str, list[tuple[float, tuple[tuple[int, float], ...]]]] = {}
        tops = result.top_logprobs or [[] for _ in result.request_ids]
        for rid, logprob, top in zip(result.request_ids, result.logprobs, tops, strict=True):
            logprobs.setdefault(rid, []).append((logprob, tuple(top)))
        self._publish(token_events, logprobs)
        self.step_seconds += time.perf_counter() - step_started
        return True

    def _forget(self, request_id: str) -> None:
        self._metrics.pop(request_id, None)
        self._prompt_logprobs.pop(request_id, None)
        self._unscheduled.discard(request_id)
        self.spec.forget(request_id)

    # ----- publishing ----------------------------------------------------------------

    def _publish(
        self,
        token_events: list[Any],
        logprobs: dict[str, list[tuple[float, tuple[tuple[int, float], ...]]]],
    ) -> None:
        events: StepEvents = {}
        for rid, token_ids, finish in token_events:
            state = self._text.get(rid)
            if state is None:
                continue
            out = events.setdefault(rid, [])
            token_logprobs = logprobs.get(rid, [])
            for k, token_id in enumerate(token_ids):
                text, stopped = self._text_delta(state, [token_id])
                last = k == len(token_ids) - 1
                finish_now = finish if last else None
                if stopped:
                    self.scheduler.abort_request(rid)
                    finish_now = FinishReason.STOP
                elif finish_now is not None:
                    text += self._flush_text(state)
                logprob, top = token_logprobs[k] if k < len(token_logprobs) else (0.0, ())
                prompt = None
                if state.num_emitted == 0 and rid in self._prompt_logprobs:
                    held = self._prompt_logprobs.pop(rid)
                    prompt = tuple(held[pos] for pos in sorted(held))
                out.append(
                    TokenEvent(
                        token_id,
                        text,
                        logprob,
                        state.num_emitted,
                        None if finish_now is None else finish_now.value,
                        top,
                        prompt,
                    )
                )
                state.num_emitted += 1
                if finish_now is not None:
                    del self._text[rid]
                    self._forget(rid)
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
        self._forget(request_id)
        state = self._text.pop(request_id, None)
        if state is not None:
            self._deliver({request_id: [StreamEnd(reason.value)]})

    def _abort_all(self) -> None:
        for rid in list(self._text):
            self.scheduler.abort_request(rid)
            self._finish(rid, FinishReason.ABORT)


class EngineStepError(StreamgenError):
    """A step failed with an unexpected exception; its requests were aborted."""

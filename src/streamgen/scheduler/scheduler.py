"""The scheduler: which requests run this step, and how many new tokens each.

One rule (vLLM v1): every request catches ``num_computed_tokens`` up to its
token count (prompt + generated). A step gives each chosen request
``min(tokens left, budget left)`` new tokens; a fresh prompt, a chunk of a
long prompt, the tail after a prefix-cache hit and a one-token decode are
the same thing.

Each :meth:`Scheduler.schedule`::

    1. running requests, by (priority desc, arrival asc), credit > 0:
         grow the block table; if blocks are short, preempt the running
         request that is first in *victim order* (credit-starved first, then
         lowest priority, then latest arrival), possibly the request itself.
    2. swapped and waiting requests, same order, while budget and slots last:
         swap in / attach the cached prefix and allocate; if blocks or slots
         are short, preempt running requests of strictly lower priority (or
         credit-starved ones) that were not admitted this step.
    3. build the ModelBatch from what was scheduled.

Hysteresis (no ping-pong): a waiting request only displaces a running one
of *strictly* lower priority, never one admitted or resumed in the same
step, and a request preempted in a step is not re-admitted in that step.
Between equal priorities the earlier arrival always wins, so two
equal-priority requests never take turns preempting each other.

Opt-in aging (``SchedulerConfig.priority_aging_s``): a queued request competes with
its priority plus one per ``priority_aging_s`` seconds since it was queued or last
preempted (the scheduler's clock is injectable, so tests run on a fake one); off by
default, so the strict order above is the default.

Parallel sampling (``Request.fork_parent``): a request added with a live parent of the
same prompt waits (FORKING) while the parent computes all of the prompt but its last
token (``hold_at``); at the next schedule it forks the parent's block table (the block
manager's refcounted sharing) and both compute that last token, each with its own sample,
so the partial last block is copied on write and every full block stays shared. A fork
that cannot be made (no running slot, the parent swapped out, aborted or past its hold)
turns the request into an ordinary waiting one, which still shares the parent's full
blocks through the prefix cache.

Invariants: every live request is in exactly one of ``_running``,
``_waiting``, ``_swapped`` or its parent's entry of ``_forks``; only running
requests hold device blocks, only swapped ones hold host blocks; finished
requests hold nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from streamgen.errors import ConfigError, RequestError
from streamgen.kv import BlockManager
from streamgen.runner.batch import ModelBatch, RunnerOutput
from streamgen.scheduler import blocks
from streamgen.scheduler.config import SchedulerConfig
from streamgen.scheduler.output import (
    SchedulerOutput,
    SchedulerStats,
    StepState,
    TokenEvent,
    make_chunk,
    victim_key,
)
from streamgen.scheduler.request import FinishReason, Request, RequestStatus, can_fork
from streamgen.scheduler.update import sampled_tokens, take_tokens


class Scheduler:
    """Continuous batching over a :class:`~streamgen.kv.BlockManager`.

    Example (a fake runner that always samples token 7)::

        >>> from streamgen.kv import BlockManager
        >>> from streamgen.runner.batch import RunnerOutput
        >>> from streamgen.sampling_params import SamplingParams
        >>> s = Scheduler(SchedulerConfig(block_size=4), BlockManager(8, 4), max_model_len=32)
        >>> s.add_request(Request("a", [1, 2, 3], SamplingParams(max_tokens=2)))
        >>> out = s.schedule()
        >>> out.num_scheduled_tokens
        {'a': 3}
        >>> s.update(RunnerOutput(["a"], [7]))
        [('a', [7], None)]
        >>> _ = s.schedule(); s.update(RunnerOutput(["a"], [7]))
        [('a', [7], <FinishReason.LENGTH: 'length'>)]
        >>> s.has_unfinished()
        False
    """

    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        *,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] | list[int] | frozenset[int] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if block_manager.block_size != config.block_size:
            raise ConfigError(
                f"block_size {config.block_size} differs from the block manager's "
                f"{block_manager.block_size}"
            )
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int):
            raise ConfigError(f"max_model_len must be an int, got {max_model_len!r}")
        if max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1, got {max_model_len}")
        self.config = config
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        # A request never grows past what the whole pool holds, so it can always run alone.
        self._context_limit = min(max_model_len, block_manager.num_total_blocks * config.block_size)
        self._requests: dict[str, Request] = {}
        self._running: list[Request] = []
        self._waiting: list[Request] = []
        self._swapped: list[Request] = []
        self._forks: dict[str, list[Request]] = {}  # parent id -> requests to fork off it
        self._num_forks = 0
        self._num_constrained = 0  # live requests with a grammar (structured outputs)
        self._last_scheduled: dict[str, int] = {}
        self._last_drafts: dict[str, tuple[int, int]] = {}
        self._next_arrival = 0
        self._num_preemptions = 0
        self._clock = clock

    # ----- commands -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Validate and queue a request (it gets the next arrival number).

        Raises:
            RequestError: the id is already live.
            InvalidPromptError: the prompt is empty or longer than ``max_model_len``.
            CapacityError: the prompt needs more KV blocks than the whole pool.
        """
        if request.request_id in self._requests:
            raise RequestError(f"request id {request.request_id!r} is already in use")
        pool = self.block_manager
        request.check_prompt(self.max_model_len, pool.num_total_blocks, pool.block_size)
        request.prompt_token_ids = list(request.prompt_token_ids)
        request.arrival = self._next_arrival
        self._next_arrival += 1
        request.waiting_since = self._clock()
        request.num_computed_tokens = 0
        request.finish_reason = None
        request.hold_at = None
        self._requests[request.request_id] = request
        self._num_constrained += request.grammar is not None
        parent = self._requests.get(request.fork_parent or "")
        if parent is not None and can_fork(parent, request):
            request.status = RequestStatus.FORKING
            parent.hold_at = len(parent.prompt_token_ids) - 1
            self._forks.setdefault(parent.request_id, []).append(request)
        else:
            request.fork_parent = None
            request.status = RequestStatus.WAITING
            self._waiting.append(request)

    def abort_request(self, request_id: str) -> bool:
        """Finish the request now, in any state, freeing its blocks. False if unknown."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        self._finish(req, FinishReason.ABORT)
        return True

    def set_priority(self, request_id: str, priority: int) -> bool:
        """Change a live request's priority (used from the next schedule). False if unknown."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        req.priority = priority
        return True

    def add_credit(self, request_id: str, num_tokens: int) -> bool:
        """The consumer can take ``num_tokens`` more tokens. False if unknown."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        req = self._requests.get(request_id)
        if req is None:
            return False
        req.credit += num_tokens
        return True

    # ----- queries ----------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def get_request(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def running_ids(self) -> list[str]:
        return [r.request_id for r in self._running]

    def waiting_ids(self) -> list[str]:
        return [r.request_id for r in self._waiting]

    def swapped_ids(self) -> list[str]:
        return [r.request_id for r in self._swapped]

    def has_constrained(self) -> bool:
        """Whether any live request has a grammar (the step then computes masks)."""
        return self._num_constrained > 0

    def forking_ids(self) -> list[str]:
        return [r.request_id for children in self._forks.values() for r in children]

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=len(self._waiting) + sum(len(c) for c in self._forks.values()),
            num_swapped=len(self._swapped),
            num_preemptions=self._num_preemptions,
            num_forks=self._num_forks,
        )

    # ----- one step ---------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Decide this step's batch. Call :meth:`update` with the runner's output next."""
        step = StepState(budget=self.config.max_num_batched_tokens)
        self._make_forks()
        for req in sorted(self._running, key=Request.order_key):
            if step.budget == 0:
                break
            if req.status is not RequestStatus.RUNNING or req.credit <= 0:
                continue
            num_new = blocks.num_new_tokens(req, req.num_computed_tokens, step.budget, self.config)
            if num_new == 0:  # held at its fork point until the next schedule
                continue
            if self._reserve_draft(req, num_new, step):
                continue
            while not blocks.grow(self.block_manager, req, req.num_computed_tokens + num_new, step):
                victim = min(
                    [r for r in self._running if r.request_id not in step.scheduled],
                    key=victim_key,
                )
                self._preempt(victim, step)
                if victim is req:
                    break
            else:
                self._schedule(req, num_new, step)

        aging = self.config.priority_aging_s
        now = self._clock() if aging is not None else 0.0

        def priority(r: Request) -> int:
            return r.effective_priority(now, aging)

        queued = sorted(self._swapped + self._waiting, key=lambda r: (-priority(r), r.arrival))
        for req in queued:
            if step.budget == 0:
                break
            if req.credit <= 0 or req.request_id in step.preempted:
                continue
            if not self._admit(req, step, priority(req)):
                break  # strict priority order: nothing lower jumps ahead

        self._last_scheduled = step.scheduled
        self._last_drafts = step.draft_budgets
        return self._build_output(step)

    def update(self, output: RunnerOutput) -> list[TokenEvent]:
        """Apply the runner's output for the last :meth:`schedule`; return token events.

        Requests aborted since that schedule are skipped.
        """
        drafts = self._last_drafts
        live = self._last_scheduled  # aborted requests were already dropped from it
        sampled, expected = sampled_tokens(output, live, self._requests, drafts)
        self._last_scheduled = {}
        self._last_drafts = {}
        events: list[TokenEvent] = []
        bm = self.block_manager
        for rid, num_new in live.items():
            req = self._requests[rid]
            req.num_computed_tokens += num_new
            if rid not in expected:
                bm.commit_full_blocks(rid, req.all_token_ids, req.num_computed_tokens)
                continue
            tokens = sampled[rid]
            # Accepted draft tokens are computed (their K/V was moved into place);
            # the last token is new, like a plain step's sample.
            num_computed = req.num_computed_tokens + len(tokens) - 1
            emitted, reason = take_tokens(req, tokens, self.eos_token_ids, self._context_limit)
            req.num_computed_tokens = min(num_computed, req.num_tokens)
            bm.commit_full_blocks(rid, req.all_token_ids, req.num_computed_tokens)
            if rid in drafts and reason is None:
                bm.trim(rid, req.num_tokens)  # give back the rejected drafts' slots
            events.append((rid, emitted, reason))
            if reason is not None:
                self._finish(req, reason)
        return events

    # ----- internals ----------------------------------------------------------------

    def _make_forks(self) -> None:
        """Fork every parent that computed its prompt up to its hold (see the module doc);
        a request that cannot fork now becomes an ordinary waiting one."""
        for parent_id, children in list(self._forks.items()):
            parent = self._requests[parent_id]
            assert parent.hold_at is not None
            if parent.num_computed_tokens < parent.hold_at:
                continue  # still computing its prompt (or queued again after a preemption)
            del self._forks[parent_id]
            parent.hold_at = None
            for child in children:
                if parent.status is RequestStatus.RUNNING and (
                    len(self._running) < self.config.max_num_seqs
                ):
                    self.block_manager.fork(parent_id, child.request_id)
                    child.num_computed_tokens = parent.num_computed_tokens
                    child.status = RequestStatus.RUNNING
                    self._running.append(child)
                    self._num_forks += 1
                else:
                    self._release_fork(child)

    def _release_fork(self, child: Request) -> None:
        child.fork_parent = None
        child.status = RequestStatus.WAITING
        child.waiting_since = self._clock()
        self._waiting.append(child)

    def _reserve_draft(self, req: Request, num_new: int, step: StepState) -> bool:
        """Schedule a decode with room for a draft tree, if it fits without preempting.

        The tree is cut to what the step can use: the token budget, the
        consumer's credit and ``max_tokens`` (a step emits at most depth + 1
        tokens) and the context limit. False: schedule a plain step instead.
        """
        decoding = num_new == 1 and req.num_tokens - req.num_computed_tokens == 1
        if req.max_draft_nodes <= 0 or not decoding:
            return False
        emit_room = req.credit - 1
        if req.params.max_tokens is not None:
            emit_room = min(emit_room, req.params.max_tokens - len(req.output_token_ids) - 1)
        max_depth = min(req.max_draft_depth, emit_room)
        max_nodes = min(req.max_draft_nodes, step.budget - 1, self._context_limit - req.num_tokens)
        if max_depth <= 0 or max_nodes <= 0:
            return False
        num_slots = req.num_tokens + max_nodes
        if not self.block_manager.can_allocate(req.request_id, num_slots):
            return False  # speculation never preempts anyone
        if not blocks.grow(self.block_manager, req, num_slots, step):
            return False
        self._schedule(req, 1, step)
        step.budget -= max_nodes
        step.draft_budgets[req.request_id] = (max_nodes, min(max_depth, max_nodes))
        return True

    def _schedule(self, req: Request, num_new: int, step: StepState) -> None:
        step.scheduled[req.request_id] = num_new
        step.budget -= num_new

    def _preempt(self, victim: Request, step: StepState) -> None:
        rid = victim.request_id
        step.budget += step.scheduled.pop(rid, 0)
        step.budget += step.draft_budgets.pop(rid, (0, 0))[0]
        self._running.remove(victim)
        if blocks.release(self.block_manager, victim, step, self.config):
            victim.status = RequestStatus.SWAPPED
            self._swapped.append(victim)
        else:
            victim.status = RequestStatus.WAITING
            self._waiting.append(victim)
        victim.num_preemptions += 1
        victim.waiting_since = self._clock()
        self._num_preemptions += 1
        step.preempted.add(rid)
        step.preempted_ids.append(rid)

    def _admit(self, req: Request, step: StepState, priority: int) -> bool:
        """Swap in or start a queued request (at its effective ``priority``), preempting
        lower-priority work if needed."""
        bm = self.block_manager
        while True:
            if len(self._running) < self.config.max_num_seqs:
                swapped = req.status is RequestStatus.SWAPPED
                admit = blocks.swap_in if swapped else blocks.start
                num_new = admit(bm, req, step, self.config)
                if num_new > 0:
                    (self._swapped if swapped else self._waiting).remove(req)
                    req.status = RequestStatus.RUNNING
                    self._running.append(req)
                    step.admitted.add(req.request_id)
                    self._schedule(req, num_new, step)
                    return True
            victims = [
                r
                for r in self._running
                if r.request_id not in step.admitted and (r.priority < priority or r.credit <= 0)
            ]
            if not victims or not blocks.could_fit(bm, req, victims, self.config):
                return False
            self._preempt(min(victims, key=victim_key), step)

    def _build_output(self, step: StepState) -> SchedulerOutput:
        chunks = [
            make_chunk(self._requests[rid], num_new, self.block_manager.block_table(rid))
            for rid, num_new in step.scheduled.items()
        ]
        return SchedulerOutput(
            batch=ModelBatch(chunks),
            num_scheduled_tokens=dict(step.scheduled),
            blocks_to_copy=step.copies,
            blocks_to_swap_out=step.swap_out,
            blocks_to_swap_in=step.swap_in,
            preempted_ids=step.preempted_ids,
            draft_budgets=dict(step.draft_budgets),
        )

    def _finish(self, req: Request, reason: FinishReason) -> None:
        queue = {
            RequestStatus.RUNNING: self._running,
            RequestStatus.WAITING: self._waiting,
            RequestStatus.SWAPPED: self._swapped,
        }.get(req.status)
        if req.status is RequestStatus.FORKING:
            assert req.fork_parent is not None
            queue = self._forks[req.fork_parent]
            if queue == [req]:  # the last to fork off it: the parent no longer holds
                del self._forks[req.fork_parent]
                self._requests[req.fork_parent].hold_at = None
        if queue is not None:
            queue.remove(req)
        for child in self._forks.pop(req.request_id, []):  # a parent gone before its forks
            self._release_fork(child)
        if req.request_id in self.block_manager:
            self.block_manager.free(req.request_id)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        del self._requests[req.request_id]
        self._num_constrained -= req.grammar is not None
        self._last_scheduled.pop(req.request_id, None)
        self._last_drafts.pop(req.request_id, None)

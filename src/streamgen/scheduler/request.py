"""One request's scheduling state.

Invariants:

* ``0 <= num_computed_tokens <= num_tokens`` where ``num_tokens`` counts the
  prompt and every generated token. The scheduler only ever moves
  ``num_computed_tokens`` towards ``num_tokens`` (or back to 0 on a
  recompute preemption); generated tokens are never dropped.
* ``credit`` is how many more tokens the consumer can take; a request with
  ``credit <= 0`` is not scheduled (backpressure).
* ``hold_at`` (parallel sampling): while set, the request computes at most that many
  tokens, so that the requests forking off it share its prompt's KV up to there.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from streamgen.errors import CapacityError, InvalidPromptError
from streamgen.sampling_params import SamplingParams

UNLIMITED_CREDIT = 1 << 62
"""Default credit: a consumer that never pushes back."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued, holds no blocks (new or recompute-preempted)
    RUNNING = "running"  # holds device blocks and a running slot
    SWAPPED = "swapped"  # KV in host blocks (swap-preempted)
    FORKING = "forking"  # waits for its fork parent's prompt (parallel sampling), no blocks
    FINISHED = "finished"  # done or aborted; holds nothing


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token id
    LENGTH = "length"  # max_tokens or the context limit
    ABORT = "abort"


@dataclass(slots=True, eq=False)
class Request:
    """A request as the scheduler sees it: token ids, progress, priority, credit.

    ``arrival`` is assigned by :meth:`Scheduler.add_request` (a monotonic
    counter); among equal priorities, earlier arrival runs first.

    Example:
        >>> r = Request("a", [1, 2, 3], priority=1)
        >>> r.num_tokens, r.num_computed_tokens, r.status
        (3, 0, <RequestStatus.WAITING: 'waiting'>)
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    credit: int = UNLIMITED_CREDIT
    arrival: int = 0
    waiting_since: float = 0.0  # scheduler clock when last queued (priority aging)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    # Speculation: the largest draft tree this request may verify in a step
    # (set by the engine's speculation policy; 0 nodes = plain decoding).
    max_draft_nodes: int = 0
    max_draft_depth: int = 0
    # Parallel sampling: the live request whose prompt KV this one shares (a fork of its
    # block table once that prompt is computed but its last token), None once forked or
    # for a request of its own. ``hold_at``: set on the parent until its forks are made.
    fork_parent: str | None = None
    hold_at: int | None = None
    # Structured outputs: the grammar state (``structured.GrammarState``: advanced with
    # every emitted token, so it has consumed exactly ``output_token_ids``), or None.
    grammar: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Prompt logprobs asked and not yet delivered (they go with the first token, so
        a request recomputed after that computes none)."""
        return self.params.prompt_logprobs is not None and not self.output_token_ids

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def order_key(self) -> tuple[int, int]:
        """Scheduling order: higher priority first, then earlier arrival."""
        return (-self.priority, self.arrival)

    def effective_priority(self, now: float, aging_s: float | None) -> int:
        """The priority plus one per ``aging_s`` seconds waited (queued requests only)."""
        if aging_s is None:
            return self.priority
        return self.priority + int(max(0.0, now - self.waiting_since) // aging_s)

    def finish_check(
        self, token: int, eos_token_ids: frozenset[int], context_limit: int
    ) -> FinishReason | None:
        """Why the request ends after ``token`` was appended (None: it goes on)."""
        params = self.params
        num_output = len(self.output_token_ids)
        if self.grammar is not None and self.grammar.is_done:
            return FinishReason.STOP  # the constraint is complete: nothing may follow
        # min_tokens: EOS and stop ids only count once enough tokens were generated.
        if num_output > params.min_tokens:
            if token in params.stop_token_ids:
                return FinishReason.STOP
            if not params.ignore_eos and token in eos_token_ids:
                return FinishReason.STOP
        if params.max_tokens is not None and num_output >= params.max_tokens:
            return FinishReason.LENGTH
        if self.num_tokens >= context_limit:
            return FinishReason.LENGTH
        return None

    def check_prompt(self, max_model_len: int, num_pool_blocks: int, block_size: int) -> None:
        """Raise if the prompt can never run (checked before queueing).

        Raises:
            InvalidPromptError: the prompt is empty or longer than ``max_model_len``.
            CapacityError: the prompt needs more KV blocks than the whole pool.
        """
        rid, num_prompt = self.request_id, len(self.prompt_token_ids)
        if num_prompt == 0:
            raise InvalidPromptError(f"request {rid!r}: the prompt is empty")
        if num_prompt > max_model_len:
            raise InvalidPromptError(
                f"request {rid!r}: prompt of {num_prompt} tokens exceeds "
                f"max_model_len={max_model_len}"
            )
        num_blocks = -(-num_prompt // block_size)
        if num_blocks > num_pool_blocks:
            raise CapacityError(
                f"request {rid!r}: prompt of {num_prompt} tokens needs {num_blocks} KV blocks "
                f"of {block_size} tokens, the pool has {num_pool_blocks}"
            )


def can_fork(parent: Request, child: Request) -> bool:
    """Whether ``child`` can wait to fork off ``parent``: the same prompt, a token left to
    compute each, the parent not past its hold point, neither scoring its prompt."""
    num_prompt = len(parent.prompt_token_ids)
    return (
        parent.prompt_token_ids == child.prompt_token_ids
        and num_prompt >= 2
        and not parent.output_token_ids
        and parent.num_computed_tokens <= num_prompt - 1
        and parent.fork_parent is None
        and parent.params.prompt_logprobs is None
        and child.params.prompt_logprobs is None
    )

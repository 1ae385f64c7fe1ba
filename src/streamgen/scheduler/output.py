"""What one ``schedule()`` decided: the batch plus the block moves the runner
must do before running it (swap out, then swap in, then copies)."""

from __future__ import annotations

from dataclasses import dataclass, field

from streamgen.kv import BlockCopy
from streamgen.runner.batch import ModelBatch, SamplingRequest, SequenceChunk
from streamgen.scheduler.request import FinishReason, Request

TokenEvent = tuple[str, list[int], FinishReason | None]
"""``(request_id, new token ids, finish reason or None)`` from ``Scheduler.update``."""


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    """One step's decision.

    Attributes:
        batch: The chunks to run, one per scheduled request.
        num_scheduled_tokens: request id -> new tokens computed this step.
        blocks_to_copy: ``(src, dst)`` device copies (copy-on-write).
        blocks_to_swap_out: ``(device, host)`` copies of preempted requests.
        blocks_to_swap_in: ``(host, device)`` copies of resumed requests.
        preempted_ids: Requests preempted this step, in order.
        draft_budgets: request id -> ``(max_nodes, max_depth)`` of the draft
            tree it may verify this step; its blocks already cover the root
            plus ``max_nodes`` slots. The batch holds only the root: the
            engine asks the drafter and attaches the tree to the chunk.
    """

    batch: ModelBatch
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    blocks_to_copy: list[BlockCopy] = field(default_factory=list)
    blocks_to_swap_out: list[BlockCopy] = field(default_factory=list)
    blocks_to_swap_in: list[BlockCopy] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    draft_budgets: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.batch.chunks


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_swapped: int
    num_preemptions: int
    num_forks: int = 0  # requests started by forking a parent's prompt (parallel sampling)


@dataclass(slots=True)
class StepState:
    """Per-step bookkeeping of ``Scheduler.schedule``, passed explicitly."""

    budget: int
    scheduled: dict[str, int] = field(default_factory=dict)
    admitted: set[str] = field(default_factory=set)  # admitted/resumed: not preemptible
    preempted: set[str] = field(default_factory=set)  # not re-admitted this step
    preempted_ids: list[str] = field(default_factory=list)
    copies: list[BlockCopy] = field(default_factory=list)
    swap_out: list[BlockCopy] = field(default_factory=list)
    swap_in: list[BlockCopy] = field(default_factory=list)
    draft_budgets: dict[str, tuple[int, int]] = field(default_factory=dict)


def victim_key(req: Request) -> tuple[bool, int, int]:
    """Preemption order, smallest first: credit-starved (cannot progress anyway),
    then lowest priority, then latest arrival."""
    return (req.credit > 0, req.priority, -req.arrival)


def make_chunk(req: Request, num_new: int, block_table: list[int]) -> SequenceChunk:
    """The chunk computing ``req``'s next ``num_new`` tokens; samples if it reaches the end."""
    start = req.num_computed_tokens
    end = start + num_new
    prompt = req.prompt_token_ids
    num_prompt = len(prompt)
    # Slice prompt and output separately: no full-context copy per decode.
    token_ids = (
        prompt[start:end]
        + req.output_token_ids[max(0, start - num_prompt) : max(0, end - num_prompt)]
    )
    sampling = None
    if end == req.num_tokens:
        sampling = SamplingRequest(req.params, prompt, tuple(req.output_token_ids))
    if req.wants_prompt_logprobs and start < num_prompt:
        targets = prompt[start + 1 : min(end, num_prompt - 1) + 1]
        return SequenceChunk(
            req.request_id, token_ids, start, block_table, sampling,
            prompt_logprobs=req.params.prompt_logprobs, prompt_targets=targets,
        )  # fmt: skip
    return SequenceChunk(req.request_id, token_ids, start, block_table, sampling)

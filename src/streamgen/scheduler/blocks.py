"""What the scheduler asks of the block manager for one request: grow its
table, admit it (with a prefix-cache hit), swap it in, or release it on
preemption. The queue moves stay in :mod:`streamgen.scheduler.scheduler`.

Every function either succeeds or changes nothing that matters: on False
the request's blocks are as before (a tentative prefix hit is released).
"""

from __future__ import annotations

from streamgen.errors import CapacityError
from streamgen.kv import BlockManager
from streamgen.scheduler.config import SchedulerConfig
from streamgen.scheduler.output import StepState
from streamgen.scheduler.request import Request, RequestStatus


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def num_new_tokens(req: Request, num_computed: int, budget: int, config: SchedulerConfig) -> int:
    """Tokens the request computes next: what is left, capped by budget and chunk size
    (and by ``hold_at`` while requests wait to fork off it)."""
    num_new = min(req.num_tokens - num_computed, budget)
    if config.long_prefill_chunk is not None:
        num_new = min(num_new, config.long_prefill_chunk)
    if req.hold_at is not None:
        num_new = min(num_new, req.hold_at - num_computed)
    return num_new


def grow(bm: BlockManager, req: Request, num_tokens: int, step: StepState) -> bool:
    """Give a running request blocks for ``num_tokens``; False if too few are free."""
    if not bm.can_allocate(req.request_id, num_tokens):
        return False
    try:
        bm.allocate(req.request_id, num_tokens)
        step.copies.extend(bm.prepare_append(req.request_id))
    except CapacityError:
        return False
    return True


def start(bm: BlockManager, req: Request, step: StepState, config: SchedulerConfig) -> int:
    """Attach the cached prefix of a waiting request and allocate its first chunk.

    Returns the chunk's size, or 0 (nothing held) if the blocks do not fit.
    """
    rid = req.request_id
    # A request computing prompt logprobs needs every position's logits: no cached prefix.
    # A fork parent's hit stays below its hold, so it always has a token to compute.
    tokens = req.all_token_ids if req.hold_at is None else req.all_token_ids[: req.hold_at]
    num_hit = bm.get_computed_prefix(rid, () if req.wants_prompt_logprobs else tokens)
    num_new = num_new_tokens(req, num_hit, step.budget, config)
    if not bm.can_allocate(rid, num_hit + num_new):
        bm.free(rid)
        return 0
    bm.allocate(rid, num_hit + num_new)
    req.num_computed_tokens = num_hit
    return num_new


def swap_in(bm: BlockManager, req: Request, step: StepState, config: SchedulerConfig) -> int:
    """Bring a swapped request back and allocate its next chunk; 0 if it does not fit."""
    rid = req.request_id
    num_new = num_new_tokens(req, req.num_computed_tokens, step.budget, config)
    num_tokens = req.num_computed_tokens + num_new
    needed = max(len(bm.host_block_table(rid)), blocks_for(num_tokens, config.block_size))
    if needed > bm.num_free_blocks + bm.num_cached_blocks:
        return 0
    step.swap_in.extend(bm.swap_in(rid))
    bm.allocate(rid, num_tokens)
    step.copies.extend(bm.prepare_append(rid))
    return num_new


def release(bm: BlockManager, req: Request, step: StepState, config: SchedulerConfig) -> bool:
    """Preempt: swap the request's KV out (True) or free it for recompute (False)."""
    rid = req.request_id
    table = set(bm.block_table(rid))
    # A pending copy into a block this request gives up would land in someone else's block.
    step.copies = [c for c in step.copies if c[1] not in table]
    # After a swap-in this step, a swap-out could reuse the host blocks it just read.
    if config.preemption_mode == "swap" and not step.swap_in:
        try:
            step.swap_out.extend(bm.swap_out(rid))
            return True
        except CapacityError:
            pass  # host pool full: recompute instead
    bm.free(rid)
    req.num_computed_tokens = 0
    return False


def could_fit(
    bm: BlockManager, req: Request, victims: list[Request], config: SchedulerConfig
) -> bool:
    """Upper bound: would preempting every victim free enough blocks for ``req``?"""
    max_new = num_new_tokens(req, req.num_computed_tokens, config.max_num_batched_tokens, config)
    needed = blocks_for(req.num_computed_tokens + max_new, config.block_size)
    if req.status is RequestStatus.SWAPPED:
        needed = max(needed, len(bm.host_block_table(req.request_id)))
    freeable = sum(len(bm.block_table(v.request_id)) for v in victims)
    return needed <= bm.num_free_blocks + bm.num_cached_blocks + freeable

"""Plain assertion functions shared by the state-machine tests."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from streamgen.kv import BlockManager
from streamgen.scheduler import RequestStatus, Scheduler, SchedulerConfig, SchedulerOutput


def check_block_manager(bm: BlockManager, fork_family: Mapping[str, int]) -> None:
    """Counts add up; refcounts match the tables; free / cached / used are disjoint;
    a block in two tables is full and hashed, or shared within one fork family.

    ``fork_family`` maps every live request id to its family (a fork child
    gets its parent's family).
    """
    total = bm.num_total_blocks
    assert bm.num_free_blocks + bm.num_used_blocks + bm.num_cached_blocks == total
    assert sorted(bm.request_ids()) == sorted(fork_family)
    holders: dict[int, list[str]] = {}
    for request_id in bm.request_ids():
        table = bm.block_table(request_id)
        assert len(set(table)) == len(table), (request_id, table)
        for block in table:
            holders.setdefault(block, []).append(request_id)
    for block in range(total):
        assert bm.refcount(block) >= 0
        assert bm.refcount(block) == len(holders.get(block, [])), (block, holders.get(block))
    free, cached = bm.free_block_ids(), bm.cached_block_ids()
    assert len(set(free)) == len(free) and len(set(cached)) == len(cached)
    assert not set(free) & set(cached)
    used = {b for b in range(total) if bm.refcount(b) > 0}
    assert not used & (set(free) | set(cached))
    assert len(used) == bm.num_used_blocks
    for block in free:
        assert bm.block_hash(block) is None, block
    for block in cached:
        block_hash = bm.block_hash(block)
        assert block_hash is not None and bm.refcount(block) == 0, block
    for block, owners in holders.items():
        if len(owners) < 2:
            continue
        block_hash = bm.block_hash(block)
        full_and_hashed = block_hash is not None and len(block_hash.token_ids) == bm.block_size
        one_family = len({fork_family[r] for r in owners}) == 1
        assert full_and_hashed or one_family, (block, owners)


def check_block_contents(
    bm: BlockManager,
    token_ids: Mapping[str, Sequence[int]],
    contents: Mapping[int, Mapping[int, int]],
) -> None:
    """Every computed token of an on-device request sits in its slot of its table,
    and every hashed block holds exactly the tokens its hash names.

    ``contents`` models the device KV: block id -> {slot: token id written there}.
    """
    for request_id, tokens in token_ids.items():
        if bm.is_swapped(request_id):
            continue
        table = bm.block_table(request_id)
        for pos in range(bm.num_computed_tokens(request_id)):
            block = table[pos // bm.block_size]
            slot = pos % bm.block_size
            assert contents.get(block, {}).get(slot) == tokens[pos], (request_id, pos, block)
    for block in range(bm.num_total_blocks):
        block_hash = bm.block_hash(block)
        if block_hash is not None:
            written = [contents.get(block, {}).get(slot) for slot in range(bm.block_size)]
            assert written == list(block_hash.token_ids), (block, written, block_hash)


def check_scheduler(scheduler: Scheduler, live_ids: Iterable[str], gone_ids: Iterable[str]) -> None:
    """Blocks add up; every live request is in exactly one queue and its status
    says which; only running requests hold device blocks and only swapped ones
    host blocks; finished or aborted requests hold nothing; slots are capped."""
    bm = scheduler.block_manager
    check_block_manager(bm, {rid: i for i, rid in enumerate(bm.request_ids())})
    running, waiting = scheduler.running_ids(), scheduler.waiting_ids()
    swapped, forking = scheduler.swapped_ids(), scheduler.forking_ids()
    queued = running + waiting + swapped + forking
    assert len(queued) == len(set(queued)), (running, waiting, swapped, forking)
    assert set(queued) == set(live_ids), (queued, sorted(live_ids))
    assert len(running) <= scheduler.config.max_num_seqs
    assert set(bm.request_ids()) == set(running) | set(swapped)
    statuses = (
        (running, RequestStatus.RUNNING),
        (waiting, RequestStatus.WAITING),
        (swapped, RequestStatus.SWAPPED),
        (forking, RequestStatus.FORKING),
    )
    for ids, status in statuses:
        for rid in ids:
            req = scheduler.get_request(rid)
            assert req is not None and req.status is status, (rid, status)
            assert 0 <= req.num_computed_tokens <= req.num_tokens, rid
            if status in (RequestStatus.WAITING, RequestStatus.FORKING):
                assert req.num_computed_tokens == 0, rid
            else:
                assert bm.is_swapped(rid) == (status is RequestStatus.SWAPPED), rid
    for rid in gone_ids:
        assert rid not in bm and scheduler.get_request(rid) is None, rid
    stats = scheduler.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_swapped) == (
        len(running),
        len(waiting) + len(forking),
        len(swapped),
    )
    for rid in forking:  # waits for a live parent held before its prompt's last token
        req = scheduler.get_request(rid)
        assert req is not None and req.fork_parent is not None
        parent = scheduler.get_request(req.fork_parent)
        assert parent is not None and parent.hold_at == len(parent.prompt_token_ids) - 1
        assert parent.num_computed_tokens <= parent.hold_at


def check_scheduler_output(output: SchedulerOutput, config: SchedulerConfig) -> None:
    """The step fits the token budget (draft tree slots included), one chunk per
    scheduled request, sizes agree, and reserved tree slots have blocks."""
    draft_nodes = sum(nodes for nodes, _ in output.draft_budgets.values())
    assert output.total_num_scheduled_tokens + draft_nodes <= config.max_num_batched_tokens
    for rid, (nodes, depth) in output.draft_budgets.items():
        assert 1 <= depth <= nodes, (rid, nodes, depth)
    chunk_ids = [c.request_id for c in output.batch.chunks]
    assert len(chunk_ids) == len(set(chunk_ids)) <= config.max_num_seqs
    assert set(chunk_ids) == set(output.num_scheduled_tokens)
    for chunk in output.batch.chunks:
        assert chunk.num_tokens == output.num_scheduled_tokens[chunk.request_id] > 0
        assert len(chunk.block_table) * config.block_size >= chunk.end_pos
        nodes, _ = output.draft_budgets.get(chunk.request_id, (0, 0))
        assert len(chunk.block_table) * config.block_size >= chunk.end_pos + nodes

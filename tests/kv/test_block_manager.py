"""BlockManager: accounting, prefix sharing, LRU eviction, copy-on-write, swapping."""

from __future__ import annotations

import pytest

from streamgen.errors import CapacityError
from streamgen.kv import BlockManager

SYSTEM_PROMPT = list(range(100, 140))  # 40 tokens: 2 full blocks of 16 + 8


def snapshot(bm: BlockManager) -> tuple[object, ...]:
    tables = {
        rid: (bm.block_table(rid), bm.host_block_table(rid), bm.num_computed_tokens(rid))
        for rid in bm.request_ids()
    }
    refcounts = [bm.refcount(b) for b in range(bm.num_total_blocks)]
    hashes = [bm.block_hash(b) for b in range(bm.num_total_blocks)]
    return (
        bm.free_block_ids(),
        bm.cached_block_ids(),
        refcounts,
        hashes,
        tables,
        bm.num_free_host_blocks,
    )


def check_counts(bm: BlockManager) -> None:
    used = sum(1 for b in range(bm.num_total_blocks) if bm.refcount(b) > 0)
    assert bm.num_used_blocks == used
    assert bm.num_free_blocks + bm.num_used_blocks + bm.num_cached_blocks == bm.num_total_blocks


def admit(bm: BlockManager, rid: str, token_ids: list[int]) -> int:
    """Scheduler's admission + one full prefill step; returns the prefix hit."""
    hit = bm.get_computed_prefix(rid, token_ids)
    bm.allocate(rid, len(token_ids))
    bm.commit_full_blocks(rid, token_ids, len(token_ids))
    return hit


def test_allocate_and_free_accounting() -> None:
    bm = BlockManager(num_blocks=10, block_size=16)
    assert bm.allocate("a", 17) == [0, 1]
    assert bm.allocate("a", 32) == []  # still fits in two blocks
    assert bm.allocate("a", 33) == [2]
    assert bm.block_table("a") == [0, 1, 2]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.num_cached_blocks) == (7, 3, 0)
    check_counts(bm)
    bm.free("a")
    assert "a" not in bm
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.num_cached_blocks) == (10, 0, 0)
    check_counts(bm)


def test_shared_system_prompt_shares_two_full_blocks() -> None:
    bm = BlockManager(num_blocks=20, block_size=16)
    a_tokens = [*SYSTEM_PROMPT, 1, 2, 3, 4, 5]
    b_tokens = [*SYSTEM_PROMPT, 9, 8, 7]
    assert admit(bm, "a", a_tokens) == 0
    assert admit(bm, "b", b_tokens) == 32
    a_table, b_table = bm.block_table("a"), bm.block_table("b")
    assert a_table[:2] == b_table[:2]
    assert [bm.refcount(b) for b in a_table[:2]] == [2, 2]
    assert a_table[2] != b_table[2]  # partial third block is private
    assert bm.refcount(a_table[2]) == bm.refcount(b_table[2]) == 1
    assert bm.num_used_blocks == 4
    check_counts(bm)

    no_cache = BlockManager(num_blocks=20, block_size=16, enable_prefix_caching=False)
    assert admit(no_cache, "a", a_tokens) == 0
    assert admit(no_cache, "b", b_tokens) == 0
    assert no_cache.num_used_blocks == 6


def test_prefix_hit_after_finish_revives_cached_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=16)
    admit(bm, "a", [*SYSTEM_PROMPT, 1])
    a_table = bm.block_table("a")
    bm.free("a")
    # The two hashed full blocks stay cached; the partial one is plain free.
    assert sorted(bm.cached_block_ids()) == sorted(a_table[:2])
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.num_cached_blocks) == (6, 0, 2)
    assert bm.get_computed_prefix("b", [*SYSTEM_PROMPT, 2]) == 32
    assert bm.block_table("b") == a_table[:2]
    assert (bm.num_free_blocks, bm.num_used_blocks, bm.num_cached_blocks) == (6, 2, 0)
    check_counts(bm)


def test_lru_eviction_order() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    x, y = [1, 1, 1, 1, 2, 2, 2, 2], [3, 3, 3, 3, 4, 4, 4, 4]
    admit(bm, "x", x)
    admit(bm, "y", y)
    x0, x1 = bm.block_table("x")
    y0, y1 = bm.block_table("y")
    bm.free("x")
    bm.free("y")
    # Freed tail first, so a prefix's tail is evicted before its head.
    assert bm.cached_block_ids() == [x1, x0, y1, y0]
    assert bm.num_free_blocks == 0 and bm.num_cached_blocks == 4
    assert bm.allocate("z", 4) == [x1]
    assert bm.block_hash(x1) is None
    # x's head block still hits; its tail was evicted.
    assert bm.get_computed_prefix("x2", [*x, 5]) == 4
    assert bm.cached_block_ids() == [y1, y0]
    bm.free("x2")  # x0 goes back as most recently used
    assert bm.cached_block_ids() == [y1, y0, x0]
    assert bm.allocate("w", 8) == [y1, y0]
    check_counts(bm)


def test_plain_free_blocks_are_taken_before_cached_ones() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    admit(bm, "a", [1, 2, 3, 4, 5])
    bm.free("a")
    assert bm.num_cached_blocks == 1 and bm.num_free_blocks == 3
    new_ids = bm.allocate("b", 12)
    assert bm.num_cached_blocks == 1
    assert not set(new_ids) & set(bm.cached_block_ids())


@pytest.mark.parametrize(("num_tokens", "expected_hit"), [(32, 16), (33, 32), (31, 16), (16, 0)])
def test_prefix_hit_leaves_last_token_to_compute(num_tokens: int, expected_hit: int) -> None:
    bm = BlockManager(num_blocks=8, block_size=16)
    tokens = list(range(48))
    admit(bm, "a", tokens)
    assert bm.get_computed_prefix("b", tokens[:num_tokens]) == expected_hit
    assert bm.num_computed_tokens("b") == expected_hit
    assert len(bm.block_table("b")) == expected_hit // 16


def test_recomputed_duplicate_block_is_not_registered_twice() -> None:
    bm = BlockManager(num_blocks=8, block_size=16)
    tokens = list(range(32))
    admit(bm, "a", tokens)
    assert admit(bm, "b", tokens) == 16  # block 1 recomputed into a private block
    a_table, b_table = bm.block_table("a"), bm.block_table("b")
    assert a_table[1] != b_table[1]
    assert bm.block_hash(b_table[1]) is None  # a's copy keeps serving hits
    bm.free("b")
    assert b_table[1] in bm.free_block_ids()
    check_counts(bm)


def test_fork_copy_on_write_of_partial_last_block() -> None:
    bm = BlockManager(num_blocks=8, block_size=16)
    tokens = list(range(20))
    admit(bm, "p", tokens)
    b0, b1 = bm.block_table("p")
    bm.fork("p", "c")
    assert bm.block_table("c") == [b0, b1]
    assert bm.refcount(b0) == bm.refcount(b1) == 2
    assert bm.num_used_blocks == 2
    copies = bm.prepare_append("c")
    assert len(copies) == 1
    src, dst = copies[0]
    assert src == b1 and dst not in (b0, b1)
    assert bm.block_table("c") == [b0, dst]
    assert (bm.refcount(b0), bm.refcount(b1), bm.refcount(dst)) == (2, 1, 1)
    assert bm.prepare_append("p") == []  # p's last block is private again
    assert bm.prepare_append("c") == []
    check_counts(bm)


def test_fork_full_shared_blocks_need_no_copy() -> None:
    bm = BlockManager(num_blocks=8, block_size=16)
    tokens = list(range(32))
    admit(bm, "p", tokens)
    bm.fork("p", "c")
    assert bm.prepare_append("c") == []
    assert bm.allocate("c", 33) != bm.allocate("p", 33)
    assert bm.block_table("c")[:2] == bm.block_table("p")[:2]
    check_counts(bm)


def test_fork_shared_empty_block_is_replaced_without_copy() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    bm.get_computed_prefix("p", [1, 2, 3, 4, 5])
    bm.allocate("p", 8)  # block 1 reserved but nothing computed in it yet
    bm.commit_full_blocks("p", [1, 2, 3, 4, 5], 4)
    bm.fork("p", "c")
    assert bm.prepare_append("c") == []
    assert bm.block_table("c")[0] == bm.block_table("p")[0]
    assert bm.block_table("c")[1] != bm.block_table("p")[1]


def test_swap_out_and_in_round_trip() -> None:
    bm = BlockManager(num_blocks=10, block_size=16, num_host_blocks=4)
    tokens = [*SYSTEM_PROMPT, 1]
    admit(bm, "a", tokens)
    old_table = bm.block_table("a")
    out = bm.swap_out("a")
    assert [d for d, _ in out] == old_table
    host_ids = [h for _, h in out]
    assert bm.is_swapped("a") and bm.block_table("a") == []
    assert bm.host_block_table("a") == host_ids
    assert bm.num_used_blocks == 0 and bm.num_free_host_blocks == 1
    assert bm.num_cached_blocks == 2  # hashed blocks stay cached on device
    # Fill the device with another request so swap-in must take fresh blocks.
    bm.allocate("filler", 16 * 6)
    back = bm.swap_in("a")
    assert [h for h, _ in back] == host_ids
    new_table = bm.block_table("a")
    assert [d for _, d in back] == new_table
    assert len(new_table) == len(old_table)
    assert not bm.is_swapped("a") and bm.num_free_host_blocks == 4
    assert bm.num_computed_tokens("a") == 41
    assert bm.num_used_blocks == 6 + 3
    assert bm.num_cached_blocks == 1  # swap-in evicted one of a's old cached blocks
    check_counts(bm)


def test_swap_out_of_shared_blocks_leaves_other_owner_intact() -> None:
    bm = BlockManager(num_blocks=8, block_size=16, num_host_blocks=4)
    admit(bm, "p", list(range(20)))
    bm.fork("p", "c")
    p_table = bm.block_table("p")
    assert len(bm.swap_out("c")) == 2
    assert bm.block_table("p") == p_table
    assert [bm.refcount(b) for b in p_table] == [1, 1]
    bm.free("c")
    assert bm.num_free_host_blocks == 4
    check_counts(bm)


def test_errors_leave_state_unchanged() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, num_host_blocks=2)
    admit(bm, "a", list(range(10)))  # 3 blocks
    bm.fork("a", "b")
    before = snapshot(bm)
    with pytest.raises(CapacityError, match=r"need 2 KV blocks.*1 free"):
        bm.allocate("a", 20)
    with pytest.raises(CapacityError):
        bm.allocate("new", 8)
    assert "new" not in bm
    with pytest.raises(CapacityError, match="host blocks"):
        bm.swap_out("a")
    with pytest.raises(KeyError, match="unknown request id 'zzz'"):
        bm.free("zzz")
    with pytest.raises(KeyError):
        bm.block_table("zzz")
    with pytest.raises(ValueError):
        bm.fork("a", "b")
    with pytest.raises(ValueError):
        bm.get_computed_prefix("a", [1, 2])
    with pytest.raises(ValueError):
        bm.commit_full_blocks("a", list(range(10)), 13)
    with pytest.raises(ValueError):
        bm.swap_in("a")
    assert snapshot(bm) == before
    assert not bm.can_allocate("a", 20)
    assert bm.can_allocate("a", 16)

    # Copy-on-write needs a block too.
    bm.allocate("a", 16)
    before = snapshot(bm)
    bm.fork("a", "c")
    bm.free("c")
    assert snapshot(bm) == before
    bm.fork("a", "c")
    before = snapshot(bm)
    with pytest.raises(CapacityError):
        bm.prepare_append("c")
    assert snapshot(bm) == before


def test_swap_in_without_room_changes_nothing() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, num_host_blocks=4)
    bm.allocate("a", 12)
    bm.swap_out("a")
    bm.allocate("b", 8)
    before = snapshot(bm)
    with pytest.raises(CapacityError, match="need 3 KV blocks"):
        bm.swap_in("a")
    assert snapshot(bm) == before
    with pytest.raises(ValueError, match="swapped out"):
        bm.allocate("a", 4)


def test_can_allocate_counts_prefix_hits() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    tokens = list(range(13))
    admit(bm, "a", tokens)  # 4 blocks: 3 hashed full + 1 partial
    bm.free("a")
    # 3 cached + 1 free; the hit revives 3 and needs 1 more block.
    assert bm.can_allocate("b", 13, token_ids=tokens)
    assert bm.can_allocate("b", 16, token_ids=tokens)
    assert not bm.can_allocate("b", 17, token_ids=tokens)
    assert not bm.can_allocate("c", 17)
    assert bm.can_allocate("c", 16)
    assert bm.get_computed_prefix("b", tokens) == 12
    assert bm.allocate("b", 16) != []

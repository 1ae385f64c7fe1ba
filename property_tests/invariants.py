"""Plain assertion functions shared by the state-machine tests."""

from __future__ import annotations

from streamgen.kv import BlockPool


def check_block_pool(pool: BlockPool, owned: dict[str, list[int]]) -> None:
    """free + used == total; refcounts equal the number of owners; no free block is owned."""
    assert pool.num_free + pool.num_used == pool.num_blocks
    counts = [0] * pool.num_blocks
    for blocks in owned.values():
        for block in blocks:
            counts[block] += 1
    for block, count in enumerate(counts):
        assert pool.refcount(block) == count, (block, pool.refcount(block), count)
    assert pool.num_used == sum(1 for c in counts if c > 0)

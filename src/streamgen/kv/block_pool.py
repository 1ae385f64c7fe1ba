"""A pool of fixed-size KV blocks with reference counts.

Invariant: every block id in ``range(num_blocks)`` is either free
(refcount 0, in the free list exactly once) or used (refcount >= 1, not in
the free list). ``num_free + num_used == num_blocks`` at all times.
"""

from __future__ import annotations

from collections import deque

from streamgen.errors import CapacityError


class BlockPool:
    """Allocate / free physical KV blocks.

    >>> pool = BlockPool(4)
    >>> blocks = pool.allocate(3)
    >>> pool.num_free
    1
    >>> pool.free(blocks)
    >>> pool.num_free
    4
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcounts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def refcount(self, block_id: int) -> int:
        return self._refcounts[block_id]

    def can_allocate(self, num: int) -> bool:
        return num <= len(self._free)

    def allocate(self, num: int) -> list[int]:
        """Take ``num`` free blocks (refcount 1 each); :class:`CapacityError` if short."""
        if num > len(self._free):
            raise CapacityError(f"need {num} KV blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(num)]
        for block in blocks:
            self._refcounts[block] = 1
        return blocks

    def share(self, blocks: list[int]) -> None:
        """Add a reference to used blocks (prefix sharing)."""
        for block in blocks:
            if self._refcounts[block] < 1:
                raise ValueError(f"block {block} is free; only used blocks can be shared")
            self._refcounts[block] += 1

    def free(self, blocks: list[int]) -> None:
        """Drop one reference per block; blocks reaching zero return to the pool."""
        for block in blocks:
            if self._refcounts[block] < 1:
                raise ValueError(f"block {block} freed twice")
            self._refcounts[block] -= 1
            if self._refcounts[block] == 0:
                self._free.append(block)

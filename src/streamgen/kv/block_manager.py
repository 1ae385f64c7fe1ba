"""Per-request block tables over one device block pool, with prefix caching,
copy-on-write and swapping to a host pool. Pure Python: no tensors.

A request owns a *block table*: the physical blocks holding its KV entries,
``block_size`` token slots each. Token ``p`` lives in slot ``p % block_size``
of block ``block_table[p // block_size]``::

    request "a" (20 tokens computed)     request "b" (same first 16 tokens)
    table [4, 9]                          table [4, 2]
           |  \\                                  |  \\
           |   block 9: 4/16 slots used           |   block 2 (own)
           +-- block 4: full, hashed h0 <---------+   (prefix hit: refcount 2)

Invariants (checked by ``property_tests/invariants.py``):

* ``num_free_blocks + num_used_blocks + num_cached_blocks == num_total_blocks``.
* A block's refcount equals the number of device block tables holding it.
* Free blocks have refcount 0 and no hash; cached (evictable) blocks have
  refcount 0 and a hash; used blocks have refcount >= 1.
* A block held by two tables is full and hashed (prefix sharing), or the
  tables belong to a fork family (parallel sampling) and the block is never
  written before :meth:`BlockManager.prepare_append` gives the writer its own copy.
* A failed call (``CapacityError``, ``KeyError``, ``ValueError``) changes nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from streamgen.errors import CapacityError
from streamgen.kv.prefix_cache import BlockHash, PrefixCache, hash_full_blocks

BlockCopy = tuple[int, int]
"""``(src, dst)`` block ids whose contents the runner must copy."""


@dataclass(slots=True)
class _RequestBlocks:
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of the request's first len(block_hashes) full, computed blocks.
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Set while swapped out: the host blocks holding the request's KV.
    host_block_ids: list[int] | None = None


class BlockManager:
    """Allocate, share, copy-on-write and swap KV blocks for requests.

    Admission, one step, and finish of a request (block_size 4)::

        >>> bm = BlockManager(num_blocks=8, block_size=4)
        >>> prompt = [1, 2, 3, 4, 5, 6]
        >>> bm.get_computed_prefix("a", prompt)       # nothing cached yet
        0
        >>> bm.allocate("a", len(prompt))
        [0, 1]
        >>> bm.commit_full_blocks("a", prompt, num_computed_tokens=6)  # block 0 now hashed
        >>> bm.get_computed_prefix("b", prompt)       # "b" shares block 0
        4
        >>> bm.block_table("b"), bm.refcount(0)
        ([0], 2)
        >>> bm.free("a"); bm.free("b")
        >>> bm.num_cached_blocks, bm.num_free_blocks  # block 0 stays cached
        (1, 7)

    Parallel sampling: ``fork`` shares every block, then ``prepare_append``
    copies the shared partial block before the child writes to it::

        >>> bm.get_computed_prefix("p", prompt), bm.allocate("p", 6)
        (4, [2])
        >>> bm.commit_full_blocks("p", prompt, 6)
        >>> bm.fork("p", "c")
        >>> bm.prepare_append("c")                    # (src, dst) for the runner
        [(2, 3)]
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        num_host_blocks: int = 0,
    ) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if num_host_blocks < 0:
            raise ValueError(f"num_host_blocks must be >= 0, got {num_host_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.num_total_blocks = num_blocks
        self.num_host_blocks = num_host_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcounts = [0] * num_blocks
        self._cache = PrefixCache()
        self._host_free: deque[int] = deque(range(num_host_blocks))
        self._requests: dict[str, _RequestBlocks] = {}

    # ----- counters and read-only views -------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no user and no hash (taken first by allocation)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        """Blocks with no user that keep their hash (evictable, LRU order)."""
        return self._cache.num_evictable

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - len(self._free) - self._cache.num_evictable

    @property
    def num_free_host_blocks(self) -> int:
        return len(self._host_free)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._requests

    def request_ids(self) -> list[str]:
        return list(self._requests)

    def block_table(self, request_id: str) -> list[int]:
        """The request's device blocks (empty while swapped out)."""
        return list(self._get(request_id).block_ids)

    def num_computed_tokens(self, request_id: str) -> int:
        return self._get(request_id).num_computed_tokens

    def is_swapped(self, request_id: str) -> bool:
        return self._get(request_id).host_block_ids is not None

    def host_block_table(self, request_id: str) -> list[int]:
        return list(self._get(request_id).host_block_ids or [])

    def refcount(self, block_id: int) -> int:
        return self._refcounts[block_id]

    def block_hash(self, block_id: int) -> BlockHash | None:
        return self._cache.hash_of(block_id)

    def free_block_ids(self) -> list[int]:
        return list(self._free)

    def cached_block_ids(self) -> list[int]:
        """Evictable cached blocks, least recently used (next to evict) first."""
        return self._cache.evictable_block_ids()

    # ----- admission and growth ---------------------------------------------------

    def get_computed_prefix(self, request_id: str, token_ids: Sequence[int]) -> int:
        """Attach the longest cached prefix of full blocks to a new request.

        Returns the number of tokens it covers, a multiple of ``block_size``
        and at most ``len(token_ids) - 1`` so the last prompt token is always
        recomputed (its logits are what the first sample is drawn from).
        Registers ``request_id`` with an empty table when nothing hits.
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already has a block table")
        hashes, hit_ids = self._lookup_prefix(token_ids)
        for block in hit_ids:
            if self._refcounts[block] == 0:
                self._cache.revive(block)
            self._refcounts[block] += 1
        num_computed = len(hit_ids) * self.block_size
        self._requests[request_id] = _RequestBlocks(list(hit_ids), hashes, num_computed)
        return num_computed

    def can_allocate(
        self, request_id: str, num_tokens: int, *, token_ids: Sequence[int] | None = None
    ) -> bool:
        """Whether :meth:`allocate` for ``num_tokens`` total tokens would succeed.

        For a request not yet admitted, pass ``token_ids`` to count the
        blocks a prefix hit would supply (without attaching them).
        """
        if request_id in self._requests:
            have = len(self._get_on_device(request_id).block_ids)
            reserved = 0
        else:
            _, hit_ids = self._lookup_prefix(token_ids or ())
            have = len(hit_ids)
            # Reviving a cached block takes it out of the evictable pool.
            reserved = sum(1 for b in hit_ids if self._refcounts[b] == 0)
        needed = max(0, self._num_blocks_for(num_tokens) - have)
        return needed <= self._num_available() - reserved

    def allocate(self, request_id: str, num_tokens: int) -> list[int]:
        """Grow the request's table to hold ``num_tokens`` tokens in total.

        Returns the newly appended block ids (``[]`` if it already fits).
        Registers an unknown ``request_id``. Raises :class:`CapacityError`
        (nothing changed) if too few blocks are free or evictable.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        req = self._requests.get(request_id)
        if req is not None:
            self._get_on_device(request_id)
        have = 0 if req is None else len(req.block_ids)
        needed = max(0, self._num_blocks_for(num_tokens) - have)
        self._check_available(needed, f"to grow {request_id!r} to {num_tokens} tokens")
        if req is None:
            req = self._requests[request_id] = _RequestBlocks()
        new_ids = self._take(needed)
        req.block_ids.extend(new_ids)
        return new_ids

    def commit_full_blocks(
        self, request_id: str, token_ids: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Record progress; hash every newly full, computed block into the cache.

        A block whose hash already names another block stays unhashed (the
        first copy keeps serving hits; this one is freed normally later).
        """
        req = self._get_on_device(request_id)
        capacity = len(req.block_ids) * self.block_size
        floor = len(req.block_hashes) * self.block_size
        if not floor <= num_computed_tokens <= min(len(token_ids), capacity):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} for {request_id!r} must be in "
                f"[{floor}, min(len(token_ids)={len(token_ids)}, table slots={capacity})]"
            )
        req.num_computed_tokens = num_computed_tokens
        if not self.enable_prefix_caching:
            return
        num_full = num_computed_tokens // self.block_size
        known = len(req.block_hashes)
        req.block_hashes = hash_full_blocks(token_ids, self.block_size, num_full, req.block_hashes)
        for i in range(known, num_full):
            self._cache.register(req.block_ids[i], req.block_hashes[i])

    def prepare_append(self, request_id: str) -> list[BlockCopy]:
        """Copy-on-write: give the request its own copy of shared blocks it will write.

        Blocks from the write frontier (``num_computed_tokens // block_size``)
        onwards that are shared (refcount > 1, after a :meth:`fork`) are
        replaced by fresh blocks. Returns ``(src, dst)`` copies for the ones
        already holding computed tokens (the partial last block); shared
        full blocks behind the frontier are never written and stay shared.
        """
        req = self._get_on_device(request_id)
        start = req.num_computed_tokens // self.block_size
        shared = [
            i for i in range(start, len(req.block_ids)) if self._refcounts[req.block_ids[i]] > 1
        ]
        self._check_available(len(shared), f"for copy-on-write of {request_id!r}")
        copies: list[BlockCopy] = []
        for i, new_id in zip(shared, self._take(len(shared)), strict=True):
            old_id = req.block_ids[i]
            self._release(old_id)
            req.block_ids[i] = new_id
            if i * self.block_size < req.num_computed_tokens:
                copies.append((old_id, new_id))
        return copies

    def trim(self, request_id: str, num_tokens: int) -> list[int]:
        """Release the request's blocks beyond those holding ``num_tokens`` tokens.

        Used after speculative verification: the slots of rejected draft
        tokens are given back. Only blocks past the computed tokens can go
        (they hold no hashed content). Returns the released block ids.
        """
        req = self._get_on_device(request_id)
        keep = self._num_blocks_for(num_tokens)
        if keep * self.block_size < req.num_computed_tokens:
            raise ValueError(
                f"cannot trim {request_id!r} to {num_tokens} tokens: "
                f"{req.num_computed_tokens} are computed"
            )
        released = req.block_ids[keep:]
        del req.block_ids[keep:]
        for block in reversed(released):
            self._release(block)
        return released

    def fork(self, parent_id: str, child_id: str) -> None:
        """The child shares every block of the parent (refcount +1 each)."""
        parent = self._get_on_device(parent_id)
        if child_id in self._requests:
            raise ValueError(f"request {child_id!r} already exists")
        for block in parent.block_ids:
            self._refcounts[block] += 1
        self._requests[child_id] = _RequestBlocks(
            list(parent.block_ids), list(parent.block_hashes), parent.num_computed_tokens
        )

    def free(self, request_id: str) -> None:
        """Release the request's blocks; hashed blocks stay cached (evictable)."""
        req = self._get(request_id)
        del self._requests[request_id]
        if req.host_block_ids is not None:
            self._host_free.extend(req.host_block_ids)
        # Tail first, so a prefix's tail blocks are evicted before its head.
        for block in reversed(req.block_ids):
            self._release(block)

    # ----- swapping -----------------------------------------------------------

    def swap_out(self, request_id: str) -> list[BlockCopy]:
        """Move the request's KV to host blocks; returns ``(device, host)`` copies.

        The device blocks are released; blocks shared with other requests
        stay with them, and hashed blocks stay cached.
        """
        req = self._get_on_device(request_id)
        needed = len(req.block_ids)
        if needed > len(self._host_free):
            raise CapacityError(
                f"need {needed} host blocks to swap out {request_id!r}, {len(self._host_free)} free"
            )
        host_ids = [self._host_free.popleft() for _ in range(needed)]
        copies = list(zip(req.block_ids, host_ids, strict=True))
        for block in reversed(req.block_ids):
            self._release(block)
        req.block_ids = []
        req.host_block_ids = host_ids
        return copies

    def swap_in(self, request_id: str) -> list[BlockCopy]:
        """Bring a swapped request back to fresh device blocks; ``(host, device)`` copies."""
        req = self._get(request_id)
        if req.host_block_ids is None:
            raise ValueError(f"request {request_id!r} is not swapped out")
        self._check_available(len(req.host_block_ids), f"to swap in {request_id!r}")
        host_ids = req.host_block_ids
        req.block_ids = self._take(len(host_ids))
        req.host_block_ids = None
        self._host_free.extend(host_ids)
        if self.enable_prefix_caching:
            for block, block_hash in zip(req.block_ids, req.block_hashes, strict=False):
                if self._cache.lookup(block_hash) is None:
                    self._cache.register(block, block_hash)
        return list(zip(host_ids, req.block_ids, strict=True))

    # ----- internals ------------------------------------------------------------

    def _get(self, request_id: str) -> _RequestBlocks:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"unknown request id {request_id!r}") from None

    def _get_on_device(self, request_id: str) -> _RequestBlocks:
        req = self._get(request_id)
        if req.host_block_ids is not None:
            raise ValueError(f"request {request_id!r} is swapped out; swap_in first")
        return req

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _num_available(self) -> int:
        return len(self._free) + self._cache.num_evictable

    def _check_available(self, needed: int, purpose: str) -> None:
        if needed > self._num_available():
            raise CapacityError(
                f"need {needed} KV blocks {purpose}, {len(self._free)} free + "
                f"{self._cache.num_evictable} cached (evictable)"
            )

    def _lookup_prefix(self, token_ids: Sequence[int]) -> tuple[list[BlockHash], list[int]]:
        if not self.enable_prefix_caching or not token_ids:
            return [], []
        max_blocks = (len(token_ids) - 1) // self.block_size
        return self._cache.lookup_prefix(token_ids, self.block_size, max_blocks)

    def _take(self, num: int) -> list[int]:
        """``num`` blocks at refcount 1: plain free ones first, then evict LRU cached."""
        blocks = []
        for _ in range(num):
            block = self._free.popleft() if self._free else self._cache.evict_lru()
            self._refcounts[block] = 1
            blocks.append(block)
        return blocks

    def _release(self, block: int) -> None:
        self._refcounts[block] -= 1
        if self._refcounts[block] == 0:
            if self._cache.hash_of(block) is not None:
                self._cache.add_evictable(block)
            else:
                self._free.append(block)

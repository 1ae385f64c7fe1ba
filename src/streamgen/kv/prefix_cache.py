"""Prefix cache: chained hashes of full KV blocks, and an LRU of evictable blocks.

A full block is named by the hash of its tokens *and* the hash of the block
before it, so one hash stands for the whole prefix up to that block::

    tokens:  [t0 .. t15] [t16 .. t31] [t32 .. t39]      (block_size 16)
                 |            |            |
    hashes:      h0 --------> h1           (partial: no hash)
    h0 = H(None, (t0..t15))
    h1 = H(h0,   (t16..t31))

Two requests whose prompts agree on the first 32 tokens compute the same
``h0`` and ``h1`` and so find the same physical blocks.

Every physical block is in exactly one of three states (the block manager
keeps the refcounts; this module keeps the hashes and the LRU)::

             allocate                       free (refcount -> 0)
    FREE  ------------->  USED (refcount>=1) ------------------+
     ^                     ^        |  no hash                 | has hash
     |                     |        +--------> FREE            v
     |  evict (LRU end,    +---- prefix hit (revive) ----  CACHED (refcount 0,
     +-- hash dropped) ------------------------------------  hash kept, in LRU)

Invariants kept here:

* ``block -> hash`` and ``hash -> block`` are inverse maps: a hash names at
  most one block and a block holds at most one hash.
* Every block in the evictable LRU holds a hash (only hashed blocks are worth
  keeping once nobody uses them).
* Hashes are only given to full blocks, so a cached block is never written.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class BlockHash:
    """The name of a full block: chained hash value plus the block's own tokens.

    Equality compares the tokens too, so two different blocks whose 64-bit
    hash values collide are still told apart (the parent link is by value).
    """

    value: int
    token_ids: tuple[int, ...]

    def __hash__(self) -> int:
        return self.value


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """Hash one full block chained onto ``parent`` (``None`` for the first block).

    >>> a = hash_block_tokens(None, [1, 2])
    >>> hash_block_tokens(a, [3, 4]) == hash_block_tokens(hash_block_tokens(None, [1, 2]), [3, 4])
    True
    """
    tokens = tuple(token_ids)
    parent_value = None if parent is None else parent.value
    # Python's hash of a tuple of ints is deterministic (no hash randomisation
    # for ints/None), which is all a per-process cache needs.
    return BlockHash(hash((parent_value, tokens)), tokens)


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    num_blocks: int,
    known: Sequence[BlockHash] = (),
) -> list[BlockHash]:
    """Hashes of the first ``num_blocks`` full blocks of ``token_ids``.

    ``known`` are hashes already computed for a prefix of those blocks; they
    are reused, and only the remaining blocks are hashed.
    """
    if num_blocks * block_size > len(token_ids):
        raise ValueError(
            f"{num_blocks} full blocks of {block_size} need {num_blocks * block_size} "
            f"tokens, got {len(token_ids)}"
        )
    hashes = list(known[:num_blocks])
    parent = hashes[-1] if hashes else None
    for i in range(len(hashes), num_blocks):
        parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(parent)
    return hashes


class PrefixCache:
    """Hash <-> block maps plus the LRU of evictable (refcount 0) cached blocks.

    It does not own refcounts; the block manager tells it when a hashed block
    becomes evictable (:meth:`add_evictable`), is revived (:meth:`revive`) or
    is reclaimed (:meth:`evict_lru`).

    >>> cache = PrefixCache()
    >>> h = hash_block_tokens(None, [7, 7])
    >>> cache.register(3, h)
    True
    >>> cache.lookup(h)
    3
    >>> cache.add_evictable(3)
    >>> cache.evict_lru()
    3
    >>> cache.lookup(h) is None
    True
    """

    def __init__(self) -> None:
        self._block_by_hash: dict[BlockHash, int] = {}
        self._hash_by_block: dict[int, BlockHash] = {}
        # Oldest first; values unused (OrderedDict as an ordered set).
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    @property
    def num_hashed(self) -> int:
        return len(self._hash_by_block)

    def evictable_block_ids(self) -> list[int]:
        """Evictable blocks, least recently used first."""
        return list(self._evictable)

    def lookup(self, block_hash: BlockHash) -> int | None:
        return self._block_by_hash.get(block_hash)

    def lookup_prefix(
        self, token_ids: Sequence[int], block_size: int, max_blocks: int
    ) -> tuple[list[BlockHash], list[int]]:
        """Hashes and blocks of the longest cached prefix of at most ``max_blocks`` full blocks.

        Pure lookup: refcounts and the LRU are untouched.
        """
        hashes: list[BlockHash] = []
        block_ids: list[int] = []
        parent: BlockHash | None = None
        for i in range(max_blocks):
            # Hash lazily: the first miss ends the walk.
            parent = hash_block_tokens(parent, token_ids[i * block_size : (i + 1) * block_size])
            block_id = self._block_by_hash.get(parent)
            if block_id is None:
                break
            hashes.append(parent)
            block_ids.append(block_id)
        return hashes, block_ids

    def hash_of(self, block_id: int) -> BlockHash | None:
        return self._hash_by_block.get(block_id)

    def is_evictable(self, block_id: int) -> bool:
        return block_id in self._evictable

    def register(self, block_id: int, block_hash: BlockHash) -> bool:
        """Name ``block_id`` by ``block_hash``; False (no change) if either is taken."""
        if block_hash in self._block_by_hash or block_id in self._hash_by_block:
            return False
        self._block_by_hash[block_hash] = block_id
        self._hash_by_block[block_id] = block_hash
        return True

    def add_evictable(self, block_id: int) -> None:
        """A hashed block lost its last user: keep it, most recently used end."""
        if block_id not in self._hash_by_block:
            raise ValueError(f"block {block_id} has no hash; it cannot be cached")
        self._evictable[block_id] = None

    def revive(self, block_id: int) -> None:
        """A prefix hit on an evictable block: it is used again, not evictable."""
        del self._evictable[block_id]

    def evict_lru(self) -> int:
        """Drop the least recently used evictable block's hash and return the block."""
        if not self._evictable:
            raise ValueError("no evictable cached block")
        block_id, _ = self._evictable.popitem(last=False)
        del self._block_by_hash[self._hash_by_block.pop(block_id)]
        return block_id

"""KV block bookkeeping: pure Python, no tensors (the scheduler tests it in microseconds)."""

from streamgen.kv.block_manager import BlockCopy, BlockManager
from streamgen.kv.prefix_cache import BlockHash, PrefixCache, hash_block_tokens

__all__ = [
    "BlockCopy",
    "BlockHash",
    "BlockManager",
    "PrefixCache",
    "hash_block_tokens",
]

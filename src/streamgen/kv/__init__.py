"""KV block bookkeeping: pure Python, no tensors (the scheduler tests it in microseconds)."""

from streamgen.kv.block_pool import BlockPool

__all__ = ["BlockPool"]

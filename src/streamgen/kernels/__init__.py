"""Triton kernels for the paged KV cache, each beside a pure-torch reference.

::

    reshape_and_cache.py   new K/V rows -> their cache slots (optionally fp8 e4m3 + per-head scale)
    paged_decode.py        one query token per sequence, split-K over context partitions
    decode_reduce.py       merges the partitions of paged_decode (log-sum-exp weighted)
    paged_extend.py        a chunk of new tokens per sequence: cached prefix + causal part,
                           or the sequence's token tree (AttentionMetadata.tree_mask)
    reference.py           the torch references every kernel is tested against
    common.py              shared launch helpers and @triton.jit helpers

Importing this package does not import triton; the kernel modules do. On a
machine without CUDA the kernels run only under ``TRITON_INTERPRET=1``, which
must be set before the first kernel module is imported (triton decides at
``@triton.jit`` time whether a function is compiled or interpreted).

Every kernel accumulates in float32, whatever the cache dtype.
"""

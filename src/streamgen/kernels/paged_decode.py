"""Paged decode attention: one new query token per sequence, split-K over the context.

::

    grid = (num_seqs, num_kv_heads, num_partitions)

    keys of sequence s:  [first_key ............................ seq_len)
                          | partition 0 | partition 1 | ... |      (partition_size keys each)
                          | tile | tile | ...                      (TILE keys per loop step)

``first_key`` is 0, or ``seq_len - sliding_window`` with a window. A program
serves every query head of one kv head (GQA): its rows are the group's heads,
padded to what ``tl.dot`` accepts. Each tile gathers its keys through the
block table one position at a time, so the kernel works for any block size
and any (shuffled) block order. Softmax is online (running max and sum in
float32, log2 domain). With one partition the program writes the output
directly; otherwise :mod:`streamgen.kernels.decode_reduce` merges them.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from streamgen.kernels.common import (
    FP8_DTYPE,
    check_kv_cache,
    check_query,
    default_tile,
    dot_dtype,
    dot_precision,
    load_paged_tile,
    min_dot_size,
    padded,
    soft_cap,
)
from streamgen.kernels.decode_reduce import decode_reduce

DEFAULT_PARTITION_SIZE = 512


@triton.jit
def _paged_decode_kernel(
    output_ptr,  # [num_seqs, num_heads, head_dim] (written when SINGLE_PARTITION)
    partial_acc_ptr,  # [num_seqs, num_heads, max_partitions, head_dim] float32
    partial_max_ptr,  # [num_seqs, num_heads, max_partitions] float32
    partial_sum_ptr,  # [num_seqs, num_heads, max_partitions] float32
    query_ptr,  # [num_seqs, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    k_scale_ptr,  # [num_kv_heads] float32 (fp8 only)
    v_scale_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks]
    seq_lens_ptr,  # [num_seqs]
    scale_log2,  # softmax scale * log2(e)
    softcap_log2,  # softcap * log2(e) with HAS_SOFTCAP: cap * tanh(s / cap) in exp2 units
    sliding_window,
    stride_query_seq,
    stride_query_head,
    stride_output_seq,
    stride_output_head,
    stride_acc_seq,
    stride_acc_head,
    stride_acc_partition,
    stride_stats_seq,
    stride_stats_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_block_tables_seq,
    QUERY_GROUP: tl.constexpr,
    BLOCK_GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    IS_FP8: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    SINGLE_PARTITION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    partition = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    first_key = 0
    if HAS_WINDOW:
        first_key = tl.maximum(seq_len - sliding_window, 0)
    partition_start = first_key + partition * PARTITION_SIZE
    partition_end = tl.minimum(partition_start + PARTITION_SIZE, seq_len)

    groups = tl.arange(0, BLOCK_GROUP)
    heads = kv_head * QUERY_GROUP + groups  # [BLOCK_GROUP]
    head_ok = groups < QUERY_GROUP
    dims = tl.arange(0, BLOCK_DIM)
    dim_ok = dims < HEAD_DIM
    query = tl.load(
        query_ptr + seq * stride_query_seq + heads[:, None] * stride_query_head + dims[None, :],
        mask=head_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_GROUP, BLOCK_DIM]
    if IS_FP8:
        k_scale = tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)

    # A finite start keeps exp2(old_max - new_max) NaN-free; every tile has a valid key.
    running_max = tl.full([BLOCK_GROUP], -1.0e30, tl.float32)
    running_sum = tl.zeros([BLOCK_GROUP], tl.float32)
    acc = tl.zeros([BLOCK_GROUP, BLOCK_DIM], tl.float32)
    block_table = block_tables_ptr + seq * stride_block_tables_seq
    for tile_start in range(partition_start, partition_end, TILE):
        positions = tile_start + tl.arange(0, TILE)  # [TILE]
        valid = positions < partition_end
        block_ids = tl.load(block_table + positions // BLOCK_SIZE, mask=valid, other=0)
        keys = load_paged_tile(
            k_cache_ptr, block_ids, positions, valid, kv_head, dims, dim_ok,
            stride_k_block, stride_k_slot, stride_k_head, BLOCK_SIZE,
        )  # fmt: skip
        if IS_FP8:
            keys = keys * k_scale
        scores = tl.dot(query, tl.trans(keys.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        scores = scores * scale_log2
        if HAS_SOFTCAP:  # on the scaled scores, before the mask (cap in log2(e) units too)
            scores = soft_cap(scores, softcap_log2)
        scores = tl.where(valid[None, :], scores, float("-inf"))  # [GROUP, TILE]
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        probs = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(running_max - new_max)
        values = load_paged_tile(
            v_cache_ptr, block_ids, positions, valid, kv_head, dims, dim_ok,
            stride_v_block, stride_v_slot, stride_v_head, BLOCK_SIZE,
        )  # fmt: skip
        if IS_FP8:
            values = values * v_scale
        acc = acc * rescale[:, None] + tl.dot(
            probs.to(DOT_DTYPE), values.to(DOT_DTYPE), input_precision=DOT_PRECISION
        )
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        running_max = new_max

    if SINGLE_PARTITION:
        out = acc / running_sum[:, None]
        tl.store(
            output_ptr
            + seq * stride_output_seq
            + heads[:, None] * stride_output_head
            + dims[None, :],
            out.to(output_ptr.dtype.element_ty),
            mask=head_ok[:, None] & dim_ok[None, :],
        )
    else:
        stats = seq * stride_stats_seq + heads * stride_stats_head + partition
        tl.store(partial_max_ptr + stats, running_max, mask=head_ok)
        tl.store(partial_sum_ptr + stats, running_sum, mask=head_ok)
        acc_rows = seq * stride_acc_seq + heads * stride_acc_head + partition * stride_acc_partition
        tl.store(
            partial_acc_ptr + acc_rows[:, None] + dims[None, :],
            acc,
            mask=head_ok[:, None] & dim_ok[None, :],
        )


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32/int64
    seq_lens: torch.Tensor,  # [num_seqs] int32/int64, >= 1
    scale: float,
    *,
    max_seq_len: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32, fp8 caches only
    v_scale: torch.Tensor | None = None,
    partition_size: int = DEFAULT_PARTITION_SIZE,
    tile_size: int | None = None,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim] in query.dtype
    """Attention of each sequence's single new token over its paged context.

    ``max_seq_len`` (the largest ``seq_lens`` entry) sizes the split-K grid;
    pass it to avoid a device-to-host sync. Contexts longer than
    ``partition_size`` keys are split into partitions computed in parallel and
    merged by a second kernel. Keys ``< seq_len - sliding_window`` are skipped.

    Example (on a GPU)::

        q = torch.randn(2, 8, 64, device="cuda", dtype=torch.bfloat16)
        k_cache = torch.randn(10, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        tables = torch.tensor([[3, 7, 0], [9, 1, 4]], device="cuda")
        lens = torch.tensor([20, 40], device="cuda")
        out = paged_decode_attention(q, k_cache, k_cache, tables, lens, 0.125)
        out.shape  # torch.Size([2, 8, 64])
    """
    group = check_query(query, k_cache)
    k_scale, v_scale = check_kv_cache(k_cache, v_cache, k_scale, v_scale)
    num_seqs, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    device = query.device
    tile = tile_size or min(default_tile(k_cache.dtype, device), partition_size)
    if partition_size % tile or tile & (tile - 1) or tile < min_dot_size(device):
        raise ValueError(
            f"partition_size {partition_size} must be a multiple of the tile {tile}, "
            f"a power of two >= {min_dot_size(device)}"
        )
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1; got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0; got {softcap}")
    output = torch.empty_like(query) if out is None else out
    if num_seqs == 0:
        return output
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    max_keys = max_seq_len if sliding_window is None else min(max_seq_len, sliding_window)
    num_partitions = max(1, math.ceil(max_keys / partition_size))
    single = num_partitions == 1
    operand_dtype = dot_dtype(k_cache.dtype, device)
    stats_shape = (num_seqs, num_heads, num_partitions)
    # Single-partition launches never touch the partial buffers: 1-element placeholders.
    partial_acc = torch.empty(
        (*stats_shape, head_dim) if not single else (1, 1, 1, 1), dtype=torch.float32, device=device
    )
    partial_max = torch.empty(
        stats_shape if not single else (1, 1, 1), dtype=torch.float32, device=device
    )
    partial_sum = torch.empty_like(partial_max)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_partitions)](
        output,
        partial_acc,
        partial_max,
        partial_sum,
        query,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        block_tables,
        seq_lens,
        scale * math.log2(math.e),
        (softcap or 0.0) * math.log2(math.e),
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        partial_acc.stride(0),
        partial_acc.stride(1),
        partial_acc.stride(2),
        partial_max.stride(0),
        partial_max.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        QUERY_GROUP=group,
        BLOCK_GROUP=padded(group, device),
        HEAD_DIM=head_dim,
        BLOCK_DIM=padded(head_dim, device),
        BLOCK_SIZE=block_size,
        TILE=tile,
        PARTITION_SIZE=partition_size,
        IS_FP8=k_cache.dtype == FP8_DTYPE,
        DOT_DTYPE=operand_dtype,
        DOT_PRECISION=dot_precision(operand_dtype),
        HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=softcap is not None,
        SINGLE_PARTITION=single,
    )
    if not single:
        decode_reduce(
            output, partial_acc, partial_max, partial_sum, seq_lens, partition_size, sliding_window
        )
    return output

"""Merge the split-K partitions of :mod:`streamgen.kernels.paged_decode`.

Partition ``p`` of a (sequence, head) left an unnormalised accumulator
``acc_p = sum_k exp2(s_k - m_p) v_k``, its running max ``m_p`` (log2 domain)
and ``l_p = sum_k exp2(s_k - m_p)``. With ``M = max_p m_p``::

    out = sum_p exp2(m_p - M) acc_p  /  sum_p exp2(m_p - M) l_p

Only the partitions that hold keys of the sequence take part (shorter
sequences of the batch have fewer than ``max_partitions``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_reduce_kernel(
    output_ptr,  # [num_seqs, num_heads, head_dim]
    partial_acc_ptr,  # [num_seqs, num_heads, max_partitions, head_dim] float32
    partial_max_ptr,  # [num_seqs, num_heads, max_partitions] float32
    partial_sum_ptr,  # [num_seqs, num_heads, max_partitions] float32
    seq_lens_ptr,  # [num_seqs]
    sliding_window,
    stride_output_seq,
    stride_output_head,
    stride_acc_seq,
    stride_acc_head,
    stride_acc_partition,
    stride_stats_seq,
    stride_stats_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    BLOCK_PARTITIONS: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_keys = tl.load(seq_lens_ptr + seq).to(tl.int32)
    if HAS_WINDOW:
        num_keys = tl.minimum(num_keys, sliding_window)
    num_partitions = tl.cdiv(num_keys, PARTITION_SIZE)

    partitions = tl.arange(0, BLOCK_PARTITIONS)
    used = partitions < num_partitions
    stats = seq * stride_stats_seq + head * stride_stats_head + partitions
    maxes = tl.load(partial_max_ptr + stats, mask=used, other=float("-inf"))
    sums = tl.load(partial_sum_ptr + stats, mask=used, other=0.0)
    weights = tl.exp2(maxes - tl.max(maxes, 0))  # [BLOCK_PARTITIONS], 0 where unused
    total = tl.sum(sums * weights, 0)

    dims = tl.arange(0, BLOCK_DIM)
    acc = tl.load(
        partial_acc_ptr
        + seq * stride_acc_seq
        + head * stride_acc_head
        + partitions[:, None] * stride_acc_partition
        + dims[None, :],
        mask=used[:, None] & (dims[None, :] < HEAD_DIM),
        other=0.0,
    )  # [BLOCK_PARTITIONS, BLOCK_DIM]
    out = tl.sum(acc * weights[:, None], 0) / total
    tl.store(
        output_ptr + seq * stride_output_seq + head * stride_output_head + dims,
        out.to(output_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def decode_reduce(
    output: torch.Tensor,  # [num_seqs, num_heads, head_dim], written in place
    partial_acc: torch.Tensor,  # [num_seqs, num_heads, max_partitions, head_dim] float32
    partial_max: torch.Tensor,  # [num_seqs, num_heads, max_partitions] float32
    partial_sum: torch.Tensor,  # [num_seqs, num_heads, max_partitions] float32
    seq_lens: torch.Tensor,  # [num_seqs]
    partition_size: int,
    sliding_window: int | None,
) -> None:
    """Combine the decode partitions into ``output`` (see the module docstring).

    Called by :func:`~streamgen.kernels.paged_decode.paged_decode_attention`;
    the partial tensors are the ones its partition kernel filled.
    """
    num_seqs, num_heads, head_dim = output.shape
    max_partitions = partial_acc.shape[2]
    _decode_reduce_kernel[(num_seqs, num_heads)](
        output,
        partial_acc,
        partial_max,
        partial_sum,
        seq_lens,
        sliding_window or 0,
        output.stride(0),
        output.stride(1),
        partial_acc.stride(0),
        partial_acc.stride(1),
        partial_acc.stride(2),
        partial_max.stride(0),
        partial_max.stride(1),
        HEAD_DIM=head_dim,
        BLOCK_DIM=triton.next_power_of_2(head_dim),
        PARTITION_SIZE=partition_size,
        BLOCK_PARTITIONS=triton.next_power_of_2(max_partitions),
        HAS_WINDOW=sliding_window is not None,
    )

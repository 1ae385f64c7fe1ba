"""Reshape-and-cache: write a step's new K/V rows into their paged-cache slots.

::

    key [num_tokens, num_kv_heads, head_dim]      slot_mapping [num_tokens]
                 |  token t                                  |
                 v                                           v
    k_cache[slot // block_size, slot % block_size] = key[t]  (slot -1: padding, skipped)

One program per token writes every head of that token. For fp8 caches the
row is divided by the head's scale, saturated at +-448 and rounded to e4m3
(ties to even), the same bits as :func:`~streamgen.kernels.reference.quantize_fp8_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from streamgen.kernels.common import (
    FP8_DTYPE,
    FP8_MAX_IN_KERNEL,
    check_kv_cache,
    round_to_e4m3,
)


@triton.jit
def _reshape_and_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    k_scale_ptr,  # [num_kv_heads] float32 (fp8 only)
    v_scale_ptr,
    slot_mapping_ptr,  # [num_tokens]
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    NUM_KV_HEADS: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IS_FP8: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_DIM)
    inside = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)  # [heads, dims]
    write = inside & (slot >= 0)
    slot = tl.maximum(slot, 0)  # padding rows compute a harmless address, then store nothing
    block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE

    key = tl.load(
        key_ptr + token * stride_key_token + heads[:, None] * stride_key_head + dims[None, :],
        mask=inside,
        other=0.0,
    )
    value = tl.load(
        value_ptr + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :],
        mask=inside,
        other=0.0,
    )
    if IS_FP8:
        k_scale = tl.load(k_scale_ptr + heads, mask=heads < NUM_KV_HEADS, other=1.0)
        v_scale = tl.load(v_scale_ptr + heads, mask=heads < NUM_KV_HEADS, other=1.0)
        key = tl.clamp(key.to(tl.float32) / k_scale[:, None], -FP8_MAX_IN_KERNEL, FP8_MAX_IN_KERNEL)
        value = tl.clamp(
            value.to(tl.float32) / v_scale[:, None], -FP8_MAX_IN_KERNEL, FP8_MAX_IN_KERNEL
        )
        key = round_to_e4m3(key)
        value = round_to_e4m3(value)
    k_offsets = block * stride_k_block + offset * stride_k_slot + heads[:, None] * stride_k_head
    v_offsets = block * stride_v_block + offset * stride_v_slot + heads[:, None] * stride_v_head
    tl.store(k_cache_ptr + k_offsets + dims[None, :], key.to(k_cache_ptr.dtype.element_ty), write)
    tl.store(v_cache_ptr + v_offsets + dims[None, :], value.to(v_cache_ptr.dtype.element_ty), write)


def reshape_and_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64, -1 skips the token
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32, fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> None:
    """Write ``key``/``value`` rows into the caches at ``slot_mapping`` (in place).

    Rows may be strided views (the model passes slices of its fused qkv); only
    ``head_dim`` must be contiguous. Non-fp8 caches store ``key.to(cache.dtype)``.

    Example (on a GPU; with 16-slot blocks, slots 17, 18 and 40 are block 1
    offsets 1 and 2, and block 2 offset 8)::

        k_cache = torch.zeros(4, 16, 2, 64, device="cuda")
        v_cache = torch.zeros_like(k_cache)
        key = torch.randn(3, 2, 64, device="cuda")
        slots = torch.tensor([17, 18, 40], device="cuda")
        reshape_and_cache(key, key, k_cache, v_cache, slots)
        assert torch.equal(k_cache[1, 1], key[0])
    """
    k_scale, v_scale = check_kv_cache(k_cache, v_cache, k_scale, v_scale)
    num_tokens = slot_mapping.shape[0]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if key.shape != (num_tokens, num_kv_heads, head_dim) or value.shape != key.shape:
        raise ValueError(
            f"key/value must be [{num_tokens}, {num_kv_heads}, {head_dim}]; "
            f"got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    if num_tokens == 0:
        return
    is_fp8 = k_cache.dtype == FP8_DTYPE
    if not is_fp8:
        # Convert on the torch side: every target then stores torch's rounding
        # (the interpreter's float32->bfloat16 cast truncates).
        key, value = key.to(k_cache.dtype), value.to(v_cache.dtype)
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        key, value = key.contiguous(), value.contiguous()
    _reshape_and_cache_kernel[(num_tokens,)](
        key,
        value,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        BLOCK_HEADS=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        BLOCK_DIM=triton.next_power_of_2(head_dim),
        BLOCK_SIZE=block_size,
        IS_FP8=is_fp8,
    )

"""Helpers shared by the paged-attention kernels: launch-time checks and
``@triton.jit`` device functions.

Paged layout read by every kernel (``head_dim`` contiguous)::

    cache [num_blocks, block_size, num_kv_heads, head_dim]
    key position p of sequence s -> cache[block_tables[s, p // block_size], p % block_size]

fp8 caches hold ``round_to_e4m3(x / scale[kv_head])`` and are read back as
``float(stored) * scale[kv_head]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_MAX_IN_KERNEL = tl.constexpr(FP8_MAX)  # jit code may only read constexpr globals
CACHE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, FP8_DTYPE)

_TRITON_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
}


def min_dot_size(device: torch.device) -> int:
    """Smallest M, N and K ``tl.dot`` accepts: 16 on NVIDIA GPUs, 1 in the interpreter."""
    return 16 if device.type == "cuda" else 1


def padded(size: int, device: torch.device) -> int:
    """``size`` rounded up to a power of two that ``tl.dot`` accepts on ``device``."""
    return max(triton.next_power_of_2(size), min_dot_size(device))


def default_tile(cache_dtype: torch.dtype, device: torch.device) -> int:
    """Keys per loop step (and, for the extend kernel, about the query rows per program).

    64 on a GPU, 32 for float32 caches there (their fp32 operands would need
    over 100 KB of shared memory at 64, more than sm_86 has); 16 in the
    interpreter, where fewer, smaller numpy ops are faster.
    """
    if device.type != "cuda":
        return 16
    return 32 if cache_dtype == torch.float32 else 64


def dot_dtype(cache_dtype: torch.dtype, device: torch.device) -> tl.dtype:
    """The dtype the kernels feed to ``tl.dot`` (accumulation is always float32).

    Half-precision caches use their own dtype on a GPU (tensor cores); fp8
    caches are dequantized into bfloat16 there. The interpreter computes in
    float32 everywhere: its half-precision dot reads the raw bits as integers.
    """
    if device.type != "cuda" or cache_dtype == torch.float32:
        return tl.float32
    if cache_dtype == FP8_DTYPE:
        return tl.bfloat16
    return _TRITON_DTYPES[cache_dtype]


def dot_precision(dtype: tl.dtype) -> str:
    """``tl.dot`` input precision: exact ("ieee") for float32 operands, never TF32."""
    return "ieee" if dtype == tl.float32 else "tf32"


def check_kv_cache(
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    k_scale: torch.Tensor | None,  # [num_kv_heads] float32, fp8 caches only
    v_scale: torch.Tensor | None,  # [num_kv_heads] float32, fp8 caches only
) -> tuple[torch.Tensor, torch.Tensor]:  # (k_scale, v_scale), placeholders if not fp8
    """Validate a cache pair and return the scales the kernels are launched with."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            "k_cache and v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim]; "
            f"got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in CACHE_DTYPES:
        raise ValueError(
            f"caches must share one dtype of {CACHE_DTYPES}; got {k_cache.dtype}, {v_cache.dtype}"
        )
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("caches must be contiguous along head_dim")
    num_kv_heads = k_cache.shape[2]
    if k_cache.dtype != FP8_DTYPE:
        if k_scale is not None or v_scale is not None:
            raise ValueError("k_scale/v_scale apply to float8_e4m3fn caches only")
        placeholder = torch.ones(1, dtype=torch.float32, device=k_cache.device)
        return placeholder, placeholder
    if k_scale is None or v_scale is None:
        raise ValueError("float8_e4m3fn caches need k_scale and v_scale ([num_kv_heads] float32)")
    for name, scale in (("k_scale", k_scale), ("v_scale", v_scale)):
        if scale.shape != (num_kv_heads,) or scale.dtype != torch.float32:
            raise ValueError(
                f"{name} must be float32 [{num_kv_heads}]; got {scale.dtype} {tuple(scale.shape)}"
            )
    return k_scale.contiguous(), v_scale.contiguous()


def check_query(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
) -> int:  # query heads per kv head
    """Validate the query against the cache; return the GQA group size."""
    if query.dim() != 3 or query.stride(-1) != 1:
        raise ValueError("query must be [num_tokens, num_heads, head_dim], contiguous in head_dim")
    num_heads, head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    if head_dim != k_cache.shape[3] or num_heads % num_kv_heads:
        raise ValueError(
            f"query [*, {num_heads}, {head_dim}] does not match cache heads {num_kv_heads} "
            f"x dim {k_cache.shape[3]} (num_heads must be a multiple of num_kv_heads)"
        )
    if query.dtype not in _TRITON_DTYPES:
        raise ValueError(f"query dtype must be float32, float16 or bfloat16; got {query.dtype}")
    return num_heads // num_kv_heads


@triton.jit
def load_paged_tile(
    cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_ids,  # [TILE] physical block of each position
    positions,  # [TILE] logical key positions
    valid,  # [TILE] bool
    kv_head,
    dims,  # [BLOCK_DIM]
    dim_ok,  # [BLOCK_DIM] bool
    stride_block,
    stride_slot,
    stride_head,
    BLOCK_SIZE: tl.constexpr,
):  # -> [TILE, BLOCK_DIM] float32 (fp8: not yet scaled), zeros where not valid
    offsets = (
        block_ids.to(tl.int64) * stride_block
        + (positions % BLOCK_SIZE).to(tl.int64) * stride_slot
        + kv_head * stride_head
    )
    tile = tl.load(
        cache_ptr + offsets[:, None] + dims[None, :],
        mask=valid[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    return tile


@triton.jit
def soft_cap(scores, cap):  # float32 -> cap * tanh(scores / cap) (Gemma 2's attention scores)
    """tanh through one exp of a non-positive argument: no overflow at any score. Scaling
    scores and cap alike scales the result: the kernels pass both in exp2's units."""
    x = scores / cap
    t = tl.exp(-2.0 * tl.abs(x))
    magnitude = (1.0 - t) / (1.0 + t)
    return cap * tl.where(x < 0, -magnitude, magnitude)


@triton.jit
def round_to_e4m3(x):  # float32, already clamped to [-448, 448] -> float32 on the e4m3 grid
    """Round to the nearest float8_e4m3fn value (ties to even), in float32.

    The final cast to fp8 is then exact. Rounding here instead of in the cast
    gives the same bits as ``torch.Tensor.to(torch.float8_e4m3fn)`` on every
    target: the interpreter's own fp32->fp8 cast drops the carry when a
    mantissa rounds up into the exponent (7.75 becomes 4.0).
    """
    bits = x.to(tl.int32, bitcast=True)
    sign = bits & -2147483648  # 0x80000000
    magnitude = bits & 0x7FFFFFFF
    # Normal e4m3 numbers keep 3 of float32's 23 mantissa bits: round the other 20.
    lowest_kept = (magnitude >> 20) & 1
    normal_bits = (magnitude + 0x7FFFF + lowest_kept) & 0x7FF00000
    normal = (normal_bits | sign).to(tl.float32, bitcast=True)
    # Below 2**-6 e4m3 is subnormal: a fixed step of 2**-9.
    steps = tl.abs(x) * 512.0
    whole = (steps + 0.5).to(tl.int32)
    is_tie = (whole.to(tl.float32) - steps) == 0.5
    whole = tl.where(is_tie & ((whole & 1) == 1), whole - 1, whole)
    subnormal_bits = (whole.to(tl.float32) / 512.0).to(tl.int32, bitcast=True) | sign
    subnormal = subnormal_bits.to(tl.float32, bitcast=True)
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal)


# Fixed when this module is imported: the kernel modules import it before their
# own @triton.jit, so they share its mode.
KERNELS_INTERPRETED: bool = isinstance(round_to_e4m3, InterpretedFunction)

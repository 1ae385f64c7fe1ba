"""reshape_and_cache kernel vs its torch reference: the caches must match bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_kv_data import FP8, make_cache

from streamgen.kernels.reference import (
    quantize_fp8_reference,
    reshape_and_cache_reference,
)
from streamgen.kernels.reshape_and_cache import reshape_and_cache

NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM = 6, 4, 3, 16


def _assert_same_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    as_bytes = (lambda t: t.view(torch.uint8)) if actual.element_size() == 1 else (lambda t: t)
    mismatch = (as_bytes(actual) != as_bytes(expected)).sum().item()
    assert mismatch == 0, f"{mismatch} cache elements differ"


@pytest.mark.parametrize(
    ("cache_dtype", "input_dtype"),
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),  # converted on the way in
        (FP8, torch.float32),
        (FP8, torch.bfloat16),
    ],
)
def test_matches_reference_at_scattered_slots(
    device: torch.device, cache_dtype: torch.dtype, input_dtype: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(1)
    cache = make_cache(
        NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, cache_dtype, device, generator
    )
    # Strided rows, like the model's slices of its fused qkv projection; some
    # values far outside the fp8 range to exercise saturation.
    fused = 4.0 * torch.randn(9, 2 * NUM_KV_HEADS + 1, HEAD_DIM, generator=generator)
    fused[0, 0, :4] = torch.tensor([1000.0, -1000.0, 1e-5, 0.0])
    fused = fused.to(input_dtype).to(device)
    key, value = fused[:, :NUM_KV_HEADS], fused[:, NUM_KV_HEADS : 2 * NUM_KV_HEADS]
    # Shuffled slots across blocks, plus two padding tokens (-1) that must write nothing.
    slots = torch.randperm(NUM_BLOCKS * BLOCK_SIZE, generator=generator)[:9]
    slots[[2, 6]] = -1
    slots = slots.to(device)
    expected_k, expected_v = cache.k_cache.clone(), cache.v_cache.clone()

    reshape_and_cache(key, value, cache.k_cache, cache.v_cache, slots, cache.k_scale, cache.v_scale)
    reshape_and_cache_reference(
        key, value, expected_k, expected_v, slots, cache.k_scale, cache.v_scale
    )

    _assert_same_bits(cache.k_cache, expected_k)
    _assert_same_bits(cache.v_cache, expected_v)


def test_fp8_rounding_edge_cases_match_torch(device: torch.device) -> None:
    # Ties between e4m3 neighbours (normal and subnormal), values whose rounding
    # carries into the exponent, saturation, signed zero and tiny subnormals.
    specials = torch.tensor(
        [7.75, 7.5, 9.0, 15.5, 240.0, 464.0, 449.0, 1e9, -1e9, -0.0, 0.0,
         2**-6, 2**-7 + 2**-10, 3 * 2**-10, 2**-10, 2**-11, -(2**-9), 1.0625, 1.1875]
    )  # fmt: skip
    generator = torch.Generator().manual_seed(2)
    values = torch.cat([specials, torch.randn(8 * 8 * 16 - len(specials), generator=generator)])
    for magnitude in (1e-3, 1.0, 100.0):
        rows = (values * magnitude).view(8, 8, 16).to(device)  # 8 tokens x 8 heads: few programs
        k_cache = torch.zeros(1, 8, 8, 16, dtype=FP8, device=device)
        v_cache = torch.zeros_like(k_cache)
        unit = torch.ones(8, device=device)
        reshape_and_cache(rows, rows, k_cache, v_cache, torch.arange(8, device=device), unit, unit)
        expected = quantize_fp8_reference(rows, unit).view(1, 8, 8, 16)
        _assert_same_bits(k_cache, expected)


def test_fp8_round_trip_error_is_within_half_a_step() -> None:
    generator = torch.Generator().manual_seed(3)
    rows = torch.randn(256, 2, 8, generator=generator) * 20
    scale = torch.tensor([0.25, 3.0])
    stored = quantize_fp8_reference(rows, scale)
    restored = stored.float() * scale[None, :, None]
    # e4m3 keeps 3 mantissa bits: relative error <= 2**-4 for normals, and an
    # absolute step of 2**-9 * scale below 2**-6 * scale.
    bound = torch.maximum(rows.abs() * 2**-4, 2**-10 * scale[None, :, None])
    assert bool(((restored - rows).abs() <= bound * 1.0001).all())
    saturated = quantize_fp8_reference(torch.full((1, 1, 1), 1e6), torch.ones(1))
    assert saturated.float().item() == 448.0


def test_rejects_fp8_cache_without_scales(device: torch.device) -> None:
    cache = torch.zeros(2, 4, 1, 8, dtype=FP8, device=device)
    rows = torch.zeros(1, 1, 8, device=device)
    with pytest.raises(ValueError, match="k_scale"):
        reshape_and_cache(rows, rows, cache, cache.clone(), torch.zeros(1, dtype=torch.int64))


def test_rejects_mismatched_rows(device: torch.device) -> None:
    cache = torch.zeros(2, 4, 2, 8, device=device)
    rows = torch.zeros(3, 1, 8, device=device)
    with pytest.raises(ValueError, match="key/value"):
        reshape_and_cache(rows, rows, cache, cache.clone(), torch.zeros(3, dtype=torch.int64))

"""paged_decode_attention (+ the split-K reduce) vs paged_decode_reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_kv_data import FP8, make_cache, scattered_block_tables

from streamgen.kernels.paged_decode import paged_decode_attention
from streamgen.kernels.reference import paged_decode_reference

BLOCK_SIZE, HEAD_DIM, NUM_BLOCKS = 8, 16, 16
# 1, block_size - 1, block_size, block_size + 1 and a multi-block context.
SEQ_LENS = [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 5 * BLOCK_SIZE + 3]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, FP8: 2e-5}


def _run(
    device: torch.device,
    cache_dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    seq_lens: list[int],
    *,
    partition_size: int = 512,
    tile_size: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    head_dim: int = HEAD_DIM,
    block_size: int = BLOCK_SIZE,
    num_blocks: int = NUM_BLOCKS,
) -> float:
    generator = torch.Generator().manual_seed(len(seq_lens) * 31 + num_heads)
    cache = make_cache(
        num_blocks, block_size, num_kv_heads, head_dim, cache_dtype, device, generator
    )
    query_dtype = torch.float32 if cache_dtype == FP8 else cache_dtype
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=generator)
    query = query.to(query_dtype).to(device)
    tables = scattered_block_tables(seq_lens, block_size, num_blocks, generator).to(device)
    lens = torch.tensor(seq_lens, device=device)
    scale = head_dim**-0.5
    kwargs = dict(sliding_window=sliding_window, k_scale=cache.k_scale, v_scale=cache.v_scale,
                  softcap=softcap)  # fmt: skip
    out = paged_decode_attention(
        query, cache.k_cache, cache.v_cache, tables, lens, scale,
        max_seq_len=max(seq_lens), partition_size=partition_size, tile_size=tile_size, **kwargs,
    )  # fmt: skip
    expected = paged_decode_reference(
        query, cache.k_cache, cache.v_cache, tables, lens, scale, **kwargs
    )
    assert out.dtype == query.dtype and out.shape == query.shape
    return (out.float() - expected.float()).abs().max().item()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, FP8], ids=str)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("partition_size", [16, 512], ids=["split_k", "one_partition"])
def test_matches_reference(
    device: torch.device,
    cache_dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    partition_size: int,
) -> None:
    error = _run(
        device, cache_dtype, num_heads, num_kv_heads, SEQ_LENS, partition_size=partition_size
    )
    assert error <= TOLERANCE[cache_dtype]


@pytest.mark.parametrize("partition_size", [16, 512], ids=["split_k", "one_partition"])
@pytest.mark.parametrize("sliding_window", [1, 5, 20])
def test_sliding_window(device: torch.device, partition_size: int, sliding_window: int) -> None:
    error = _run(
        device, torch.float32, 4, 2, SEQ_LENS,
        partition_size=partition_size, sliding_window=sliding_window,
    )  # fmt: skip
    assert error <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("partition_size", [16, 512], ids=["split_k", "one_partition"])
def test_soft_capped_scores(device: torch.device, partition_size: int) -> None:
    """Gemma 2's cap * tanh(s / cap) on the scaled scores (a cap of 0.5 bends nearly every
    score of unit-variance queries and keys, so a missing cap would fail by far)."""
    error = _run(device, torch.float32, 4, 2, SEQ_LENS, partition_size=partition_size, softcap=0.5)
    assert error <= TOLERANCE[torch.float32]


def test_partitions_left_empty_by_short_sequences(device: torch.device) -> None:
    # One long sequence sets 4 partitions; the 1-key one uses only the first.
    error = _run(device, torch.float32, 4, 1, [1, 61, 2], partition_size=16, num_blocks=12)
    assert error <= TOLERANCE[torch.float32]


def test_matches_reference_for_a_window_shorter_than_one_partition(device: torch.device) -> None:
    # Window 20 over 61 keys: the split covers keys 41..60 only, not 0..60.
    error = _run(device, torch.float32, 2, 1, [61], partition_size=16, sliding_window=20)
    assert error <= TOLERANCE[torch.float32]


def test_rejects_partition_not_multiple_of_tile(device: torch.device) -> None:
    with pytest.raises(ValueError, match="partition_size"):
        _run(device, torch.float32, 2, 2, [3], partition_size=24, tile_size=16)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16, FP8], ids=str)
def test_long_contexts_on_gpu(cache_dtype: torch.dtype) -> None:
    # Real model sizes: head_dim 128, 16-token blocks, GQA 32/8, default 512-key partitions.
    seq_lens = [1, 15, 16, 17, 511, 512, 513, 3000]
    error = _run(
        torch.device("cuda"), cache_dtype, 32, 8, seq_lens,
        head_dim=128, block_size=16, num_blocks=400,
    )  # fmt: skip
    assert error <= {torch.float16: 2e-3, torch.bfloat16: 2e-2, FP8: 2e-2}[cache_dtype]

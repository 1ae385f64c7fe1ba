"""paged_extend_attention vs paged_attention_reference: chunks over cached prefixes, trees."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_kv_data import (
    FP8,
    make_cache,
    query_start_loc,
    random_tree_mask,
    scattered_block_tables,
)

from streamgen.kernels.paged_extend import paged_extend_attention
from streamgen.kernels.reference import paged_attention_reference

BLOCK_SIZE, HEAD_DIM, NUM_BLOCKS = 8, 16, 24
# Context lengths 1, bs - 1, bs, bs + 1 and multi-block; the new tokens straddle
# block boundaries (e.g. 6 new tokens at positions 3..8 of a 9-token context).
SEQ_LENS = [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 4 * BLOCK_SIZE + 3]
QUERY_LENS = [1, BLOCK_SIZE - 1, 3, 6, 11]
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, FP8: 2e-5}


def _run(
    device: torch.device,
    cache_dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    *,
    seq_lens: list[int] = SEQ_LENS,
    query_lens: list[int] = QUERY_LENS,
    sliding_window: int | None = None,
    softcap: float | None = None,
    tree_seqs: set[int] | None = None,
    seq_ids: list[int] | None = None,
    query_tile: int | None = None,
    head_dim: int = HEAD_DIM,
    block_size: int = BLOCK_SIZE,
    num_blocks: int = NUM_BLOCKS,
) -> float:
    generator = torch.Generator().manual_seed(num_heads * 7 + len(seq_lens))
    cache = make_cache(
        num_blocks, block_size, num_kv_heads, head_dim, cache_dtype, device, generator
    )
    query_dtype = torch.float32 if cache_dtype == FP8 else cache_dtype
    query = torch.randn(sum(query_lens), num_heads, head_dim, generator=generator)
    query = query.to(query_dtype).to(device)
    tables = scattered_block_tables(seq_lens, block_size, num_blocks, generator).to(device)
    starts = query_start_loc(query_lens).to(device)
    lens = torch.tensor(seq_lens, device=device)
    tree_mask = None
    if tree_seqs is not None:
        tree_mask = random_tree_mask(query_lens, tree_seqs, generator).to(device)
    scale = head_dim**-0.5
    kwargs = dict(
        sliding_window=sliding_window,
        tree_mask=tree_mask,
        k_scale=cache.k_scale,
        v_scale=cache.v_scale,
        softcap=softcap,
    )
    sentinel = torch.full_like(query, 7.0)
    out = paged_extend_attention(
        query, cache.k_cache, cache.v_cache, tables, starts, lens, scale,
        max_query_len=max(query_lens), query_tile=query_tile, out=sentinel.clone(),
        seq_ids=None if seq_ids is None else torch.tensor(seq_ids, device=device), **kwargs,
    )  # fmt: skip
    expected = paged_attention_reference(
        query, cache.k_cache, cache.v_cache, tables, starts, lens, scale, **kwargs
    )
    computed = torch.zeros(len(query), dtype=torch.bool)
    for seq in range(len(seq_lens)) if seq_ids is None else seq_ids:
        computed[int(starts[seq]) : int(starts[seq + 1])] = True
    # Rows of sequences not asked for are left exactly as they were.
    assert torch.equal(out[~computed], sentinel[~computed])
    return (out[computed].float() - expected[computed].float()).abs().max().item()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, FP8], ids=str)
@pytest.mark.parametrize(("num_heads", "num_kv_heads"), [(2, 2), (8, 2)], ids=["mha", "gqa"])
def test_matches_reference(
    device: torch.device, cache_dtype: torch.dtype, num_heads: int, num_kv_heads: int
) -> None:
    assert _run(device, cache_dtype, num_heads, num_kv_heads) <= TOLERANCE[cache_dtype]


def test_several_query_tiles_per_sequence(device: torch.device) -> None:
    # 2 tokens per program: the 11-token chunk spans 6 programs, each with its own key range.
    assert _run(device, torch.float32, 4, 2, query_tile=2) <= TOLERANCE[torch.float32]


def test_whole_prompts(device: torch.device) -> None:
    lens = [1, BLOCK_SIZE - 1, BLOCK_SIZE + 1, 2 * BLOCK_SIZE]
    error = _run(device, torch.float32, 4, 1, seq_lens=lens, query_lens=lens)
    assert error <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("sliding_window", [1, 4, 13])
def test_sliding_window(device: torch.device, sliding_window: int) -> None:
    error = _run(device, torch.float32, 4, 2, sliding_window=sliding_window, query_tile=4)
    assert error <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, FP8], ids=str)
def test_tree_mask(device: torch.device, cache_dtype: torch.dtype) -> None:
    # Sequences 2 and 4 are token trees (seq 4: an 11-node tree over a 24-token prefix);
    # the others keep their causal rows in the same mask.
    error = _run(device, cache_dtype, 4, 2, tree_seqs={2, 4}, query_tile=4)
    assert error <= TOLERANCE[cache_dtype]


def test_soft_capped_scores(device: torch.device) -> None:
    """Gemma 2's cap * tanh(s / cap), with a tree and causal chunks."""
    assert _run(device, torch.float32, 4, 2, softcap=0.5, tree_seqs={2}) <= TOLERANCE[torch.float32]


def test_only_selected_sequences_are_written(device: torch.device) -> None:
    error = _run(device, torch.float32, 4, 2, seq_ids=[4, 1])
    assert error <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("window", [3, 20])
def test_a_window_over_a_tree_counts_from_each_nodes_depth(
    device: torch.device, window: int
) -> None:
    """Sequences 2 and 4 are trees (seq 4: 11 nodes over a 24-token prefix): a window
    of 20 cuts into the prefix, one of 3 into the trees, each node's from its depth (the
    reference's _visible, itself checked against the torch backend)."""
    error = _run(device, torch.float32, 4, 2, sliding_window=window, tree_seqs={2, 4},
                 query_tile=4)  # fmt: skip
    assert error <= TOLERANCE[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("cache_dtype", [torch.float16, torch.bfloat16, FP8], ids=str)
def test_long_chunks_on_gpu(cache_dtype: torch.dtype) -> None:
    # Real model sizes: head_dim 128, 16-token blocks, GQA 32/8, a 700-token prompt.
    lens, chunks = [1, 300, 700, 1000], [1, 120, 700, 64]
    error = _run(
        torch.device("cuda"), cache_dtype, 32, 8, seq_lens=lens, query_lens=chunks,
        tree_seqs={3} if cache_dtype == torch.bfloat16 else None,
        head_dim=128, block_size=16, num_blocks=200,
    )  # fmt: skip
    assert error <= {torch.float16: 2e-3, torch.bfloat16: 2e-2, FP8: 2e-2}[cache_dtype]

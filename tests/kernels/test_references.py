"""The kernels' torch references vs TorchReferenceBackend, the project's oracle.

Closes the chain of trust: kernel == reference (the other kernel tests),
reference == TorchReferenceBackend (here). Runs on the CPU; no triton needed.
"""

from __future__ import annotations

import pytest
import torch
from paged_kv_data import (
    FP8,
    make_cache,
    make_metadata,
    random_tree_mask,
    scattered_block_tables,
    tree_rows_by_torch_backend,
)

from streamgen.attention.backend import AttentionBackend
from streamgen.attention.torch_ref import TorchReferenceBackend
from streamgen.kernels.reference import (
    paged_attention_reference,
    paged_decode_reference,
    reshape_and_cache_reference,
)

CPU = torch.device("cpu")
BLOCK_SIZE, HEAD_DIM, NUM_BLOCKS, NUM_HEADS, NUM_KV_HEADS = 4, 8, 24, 6, 2
SEQ_LENS = [1, 3, 4, 5, 14, 9]
QUERY_LENS = [1, 3, 1, 2, 6, 1]


def _step(
    cache_dtype: torch.dtype = torch.float32,
    *,
    sliding_window: int | None = None,
    tree_seqs: set[int] | None = None,
    seq_lens: list[int] = SEQ_LENS,
    query_lens: list[int] = QUERY_LENS,
    seed: int = 0,
):  # -> (query, cache, metadata)
    generator = torch.Generator().manual_seed(seed)
    cache = make_cache(NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, cache_dtype, CPU, generator)
    query = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=generator)
    tables = scattered_block_tables(seq_lens, BLOCK_SIZE, NUM_BLOCKS, generator)
    tree_mask = None
    if tree_seqs is not None:
        tree_mask = random_tree_mask(query_lens, tree_seqs, generator)
    metadata = make_metadata(
        tables, seq_lens, query_lens, BLOCK_SIZE, sliding_window=sliding_window, tree_mask=tree_mask
    )
    return query, cache, metadata


def _reference(query, cache, metadata, scale: float) -> torch.Tensor:
    return paged_attention_reference(
        query, cache.k_cache, cache.v_cache, metadata.block_tables, metadata.query_start_loc,
        metadata.seq_lens, scale, sliding_window=metadata.sliding_window,
        tree_mask=metadata.tree_mask, k_scale=cache.k_scale, v_scale=cache.v_scale,
    )  # fmt: skip


@pytest.mark.parametrize("sliding_window", [None, 1, 3, 7])
def test_attention_reference_matches_torch_backend(sliding_window: int | None) -> None:
    query, cache, metadata = _step(sliding_window=sliding_window)
    expected = TorchReferenceBackend().attend(query, cache.k_cache, cache.v_cache, metadata, 0.3)
    actual = _reference(query, cache, metadata, 0.3)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_decode_reference_matches_torch_backend() -> None:
    lens = [1, 3, 4, 5, 17]
    query, cache, metadata = _step(seq_lens=lens, query_lens=[1] * len(lens))
    expected = TorchReferenceBackend().attend(query, cache.k_cache, cache.v_cache, metadata, 0.3)
    actual = paged_decode_reference(
        query, cache.k_cache, cache.v_cache, metadata.block_tables, metadata.seq_lens, 0.3
    )
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_tree_reference_matches_torch_backend_decodes() -> None:
    query, cache, metadata = _step(tree_seqs={1, 4})
    tree_rows = [1, 2, 3, 7, 8, 9, 10, 11, 12]  # the rows of sequences 1 and 4
    expected = tree_rows_by_torch_backend(
        query, cache.k_cache, cache.v_cache, metadata, tree_rows, 0.3
    )
    actual = _reference(query, cache, metadata, 0.3)
    torch.testing.assert_close(actual[tree_rows], expected, atol=1e-5, rtol=1e-5)
    # The tree really changes the answer: a causal chunk would differ.
    causal = _reference(query, cache, _step()[2], 0.3)
    assert (causal[tree_rows] - actual[tree_rows]).abs().max() > 1e-3


@pytest.mark.parametrize("sliding_window", [2, 5, 9])
def test_windowed_tree_reference_matches_torch_backend(sliding_window: int) -> None:
    """A window over a tree counts from each node's depth in both (the torch backend's
    _apply_tree_mask, the reference's _visible): windows into the prefix and the trees."""
    query, cache, metadata = _step(sliding_window=sliding_window, tree_seqs={1, 4})
    expected = TorchReferenceBackend().attend(query, cache.k_cache, cache.v_cache, metadata, 0.3)
    actual = _reference(query, cache, metadata, 0.3)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    unwindowed = _reference(query, cache, _step(tree_seqs={1, 4})[2], 0.3)
    assert (unwindowed - actual).abs().max() > 1e-3  # the window changes the answer


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8], ids=str)
def test_low_precision_reference_matches_torch_backend_on_dequantized_cache(
    cache_dtype: torch.dtype,
) -> None:
    query, cache, metadata = _step(cache_dtype)
    # Dequantize independently of the reference: one scale per kv head (dim 2).
    k_scale = torch.ones(NUM_KV_HEADS) if cache.k_scale is None else cache.k_scale
    v_scale = torch.ones(NUM_KV_HEADS) if cache.v_scale is None else cache.v_scale
    k_float = cache.k_cache.float() * k_scale.view(1, 1, -1, 1)
    v_float = cache.v_cache.float() * v_scale.view(1, 1, -1, 1)
    expected = TorchReferenceBackend().attend(query, k_float, v_float, metadata, 0.3)
    actual = _reference(query, cache, metadata, 0.3)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_reshape_and_cache_reference_matches_backend_write_kv(cache_dtype: torch.dtype) -> None:
    _, cache, metadata = _step(cache_dtype)
    generator = torch.Generator().manual_seed(5)
    key = torch.randn(metadata.num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator)
    value = torch.randn(metadata.num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator)
    expected_k, expected_v = cache.k_cache.clone(), cache.v_cache.clone()
    backend: AttentionBackend = TorchReferenceBackend()
    backend.write_kv(key, value, expected_k, expected_v, metadata)
    reshape_and_cache_reference(key, value, cache.k_cache, cache.v_cache, metadata.slot_mapping)
    assert torch.equal(cache.k_cache, expected_k)
    assert torch.equal(cache.v_cache, expected_v)

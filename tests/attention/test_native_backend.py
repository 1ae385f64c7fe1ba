"""NativeAttentionBackend vs TorchReferenceBackend on whole steps, with every kernel variant.

The kernel reads the paged cache in place, block by block; the reference
gathers and runs SDPA. Steps mix decodes at every page boundary, prefill
chunks, token trees and sliding windows; with a small ``max_native_chunk``
the longer chunks go to the reference within the same step.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch

from streamgen.attention.backend import AttentionMetadata
from streamgen.attention.native import NativeAttentionBackend
from streamgen.attention.torch_ref import TorchReferenceBackend
from streamgen.native import NativeKernels, NativeUnavailableError

sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))

from paged_kv_data import make_cache, make_metadata, random_tree_mask, scattered_block_tables

BLOCK_SIZE, NUM_BLOCKS, NUM_HEADS, NUM_KV_HEADS = 16, 96, 6, 2
Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]


def make_step(
    seq_lens: list[int],
    query_lens: list[int],
    seed: int,
    *,
    head_dim: int = 64,
    dtype: torch.dtype = torch.float32,
    sliding_window: int | None = None,
    tree_seqs: frozenset[int] = frozenset(),
    softcap: float | None = None,
) -> Step:
    """(query [tokens, heads, dim], k_cache, v_cache, metadata) over scattered blocks."""
    g = torch.Generator().manual_seed(seed)
    cache = make_cache(
        NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, head_dim, dtype, torch.device("cpu"), g
    )
    tables = scattered_block_tables(seq_lens, BLOCK_SIZE, NUM_BLOCKS, g)
    tree_mask = random_tree_mask(query_lens, set(tree_seqs), g) if tree_seqs else None
    metadata = make_metadata(
        tables, seq_lens, query_lens, BLOCK_SIZE, sliding_window=sliding_window, tree_mask=tree_mask
    )
    metadata = dataclasses.replace(metadata, logit_softcap=softcap)
    query = torch.randn(sum(query_lens), NUM_HEADS, head_dim, generator=g).to(dtype)
    return query, cache.k_cache, cache.v_cache, metadata


def errors(backend: NativeAttentionBackend, step: Step) -> tuple[float, float]:
    """(max |native - reference|, max |reference|) in float32."""
    query, k_cache, v_cache, metadata = step
    scale = query.shape[-1] ** -0.5
    out = backend.attend(query, k_cache, v_cache, metadata, scale).float()
    expected = TorchReferenceBackend().attend(query, k_cache, v_cache, metadata, scale).float()
    assert out.shape == expected.shape
    return float((out - expected).abs().max()), float(expected.abs().max())


# Decodes at lengths 1, 15, 16, 17, 33 (empty, partial and full last pages), prefill chunks
# from scratch and after a prefix, a 6-token tree after 37 cached tokens, a long decode.
SEQ_LENS = [1, 15, 16, 17, 15, 40, 17, 43, 33, 300]
QUERY_LENS = [1, 1, 1, 1, 15, 16, 17, 6, 1, 1]


@pytest.mark.parametrize("max_native_chunk", [1, 8, 32])
@pytest.mark.parametrize("head_dim", [64, 20])  # 20: the kernels' scalar tails
def test_mixed_steps_match_reference(
    kernels: NativeKernels, max_native_chunk: int, head_dim: int
) -> None:
    backend = NativeAttentionBackend(max_native_chunk=max_native_chunk, kernels=kernels)
    for seed, kwargs in enumerate(
        [dict(tree_seqs=frozenset({7})), dict(), dict(sliding_window=20), dict(softcap=1.5),
         # a window over a tree: from each node's depth, into the prefix (20) or the tree (3)
         dict(tree_seqs=frozenset({7}), sliding_window=20),
         dict(tree_seqs=frozenset({7}), sliding_window=3)]
    ):
        step = make_step(SEQ_LENS, QUERY_LENS, seed, head_dim=head_dim, **kwargs)  # type: ignore[arg-type]
        error, _ = errors(backend, step)
        assert error < 1e-5, (kwargs, error)
        plan = backend._plan
        assert plan is not None and plan.native is not None
        # Chunks longer than max_native_chunk went to the reference, the rest to the kernel.
        expected_native = sum(1 for q in QUERY_LENS if q <= max_native_chunk)
        assert plan.native.metadata.num_seqs == expected_native
        assert (plan.reference is None) == (expected_native == len(QUERY_LENS))


def test_a_window_over_a_tree_counts_from_each_nodes_depth(kernels: NativeKernels) -> None:
    """Node 3 of the tree 0 <- 1, 0 <- 2 <- 3 sits at slot 3 and depth 2: a window of 20
    after 37 cached tokens shows it keys 20..36 of the prefix (a decode of its token at
    position 39 would), where its slot would show 21..36. The kernel gives the reference's
    rows, and the slot's rule (the same keys seen as a chain's) would not."""
    backend = NativeAttentionBackend(kernels=kernels)
    query, k_cache, v_cache, metadata = make_step([41], [4], seed=11, sliding_window=20)
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    metadata = dataclasses.replace(metadata, tree_mask=tree)
    out = backend.attend(query, k_cache, v_cache, metadata, 0.125)
    expected = TorchReferenceBackend().attend(query, k_cache, v_cache, metadata, 0.125)
    assert float((out - expected).abs().max()) < 1e-5
    by_slot = dataclasses.replace(metadata, sliding_window=None, tree_mask=None)
    shifted = make_step([41], [4], seed=11)[3]  # the chain: node 3 at position 40
    assert by_slot.seq_lens_list == shifted.seq_lens_list
    chain = TorchReferenceBackend().attend(
        query, k_cache, v_cache, dataclasses.replace(shifted, sliding_window=20), 0.125
    )
    assert float((chain[3] - expected[3]).abs().max()) > 1e-3  # key 20 is in one, not the other


def test_a_wrong_visibility_rule_would_fail(kernels: NativeKernels) -> None:
    """The comparison can fail: the same step read as non-causal differs from the reference."""
    backend = NativeAttentionBackend(kernels=kernels)
    query, k_cache, v_cache, metadata = make_step([40], [16], seed=5)
    tree = torch.ones(16, 16, dtype=torch.bool)  # every new token sees all 16: not causal
    wrong = AttentionMetadata(
        slot_mapping=metadata.slot_mapping,
        query_start_loc=metadata.query_start_loc,
        seq_lens=metadata.seq_lens,
        block_tables=metadata.block_tables,
        query_lens_list=metadata.query_lens_list,
        seq_lens_list=metadata.seq_lens_list,
        block_size=BLOCK_SIZE,
        tree_mask=tree,
    )
    out = backend.attend(query, k_cache, v_cache, wrong, 0.125)
    expected = TorchReferenceBackend().attend(query, k_cache, v_cache, metadata, 0.125)
    assert float((out - expected).abs().max()) > 1e-2
    assert torch.allclose(out[-1], expected[-1], atol=1e-5)  # the last row sees the same keys


def test_soft_capped_scores_are_capped(kernels: NativeKernels) -> None:
    """Gemma 2's cap * tanh(score / cap) runs in the kernel (the mixed-step test compares
    it with the reference); the same step uncapped is far from it, so the cap is applied."""
    backend = NativeAttentionBackend(kernels=kernels)
    query, k_cache, v_cache, metadata = make_step([40, 300], [6, 1], seed=9, softcap=1.0)
    capped = backend.attend(query, k_cache, v_cache, metadata, 0.25)
    plain = dataclasses.replace(metadata, logit_softcap=None)
    expected = TorchReferenceBackend().attend(query, k_cache, v_cache, metadata, 0.25)
    assert float((capped - expected).abs().max()) < 1e-5
    uncapped = TorchReferenceBackend().attend(query, k_cache, v_cache, plain, 0.25)
    assert float((capped - uncapped).abs().max()) > 1e-2


@pytest.mark.parametrize("head_dim", [64, 96, 20])
def test_avx512_loops_give_the_avx2_bits(head_dim: int) -> None:
    """AVX-512 attention (attention_avx512.c: transposed keys for many queries) keeps the
    AVX2 loops' arithmetic, so a row's attention has the same bits on either ISA: decodes,
    chunks, a tree, a window, soft-capping, head sizes with and without SIMD tails."""
    from streamgen.native import native_kernels
    from streamgen.native.qkernels import Isa, supported_isas

    kernels = native_kernels()
    if kernels is None or not kernels.simd or Isa.AVX512VNNI not in supported_isas():
        pytest.skip("needs the AVX2 build on an AVX-512 CPU")
    avx2 = NativeAttentionBackend(max_native_chunk=32, kernels=kernels, isa=Isa.AVX2)
    avx512 = NativeAttentionBackend(max_native_chunk=32, kernels=kernels, isa=Isa.AVX512VNNI)
    assert (avx2.table, avx512.table) == (0, 1)
    for seed, kwargs in enumerate(
        [dict(tree_seqs=frozenset({7})), dict(sliding_window=20), dict(softcap=1.5)]
    ):
        step = make_step(SEQ_LENS, QUERY_LENS, seed, head_dim=head_dim, **kwargs)  # type: ignore[arg-type]
        assert torch.equal(avx2.attend(*step, 0.125), avx512.attend(*step, 0.125)), kwargs


def test_bfloat16_cache_within_rounding(kernels: NativeKernels) -> None:
    backend = NativeAttentionBackend(kernels=kernels)
    step = make_step(SEQ_LENS, QUERY_LENS, seed=3, dtype=torch.bfloat16, tree_seqs=frozenset({7}))
    error, scale = errors(backend, step)
    assert error <= 1e-2 * max(1.0, scale)  # both compute in float32; outputs round to bf16


def test_tree_with_sliding_window_runs_in_the_kernel(kernels: NativeKernels) -> None:
    backend = NativeAttentionBackend(kernels=kernels)
    step = make_step([40, 17], [6, 1], seed=6, sliding_window=20, tree_seqs=frozenset({0}))
    error, _ = errors(backend, step)
    plan = backend._plan
    assert plan is not None and plan.reference is None and error < 1e-5


def test_bad_arguments_are_refused(kernels: NativeKernels) -> None:
    with pytest.raises(ValueError, match="max_native_chunk"):
        NativeAttentionBackend(max_native_chunk=0, kernels=kernels)


def test_missing_kernels_raise_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import streamgen.attention.native as native_module

    monkeypatch.setattr(native_module, "native_kernels", lambda: None)
    with pytest.raises(NativeUnavailableError):
        NativeAttentionBackend()


@pytest.mark.parametrize("head_dim", [64, 20])
def test_a_row_gets_the_same_bits_alone_as_in_its_step(
    kernels: NativeKernels, head_dim: int
) -> None:
    """The kernel tiles queries (4 per key pass, 6 outputs per value pass, by KV head)
    and sums softmax terms by key position, so a chunk row equals the same query decoded
    alone against the same cache, bit for bit (the engine's batch invariance)."""
    backend = NativeAttentionBackend(kernels=kernels)
    step = make_step([40, 9, 300], [1, 9, 1], seed=8, head_dim=head_dim)
    query, k_cache, v_cache, metadata = step
    together = backend.attend(query, k_cache, v_cache, metadata, 0.125)
    tables = metadata.block_tables
    for row, (seq, position) in enumerate([(0, 39), *((1, p) for p in range(9)), (2, 299)]):
        alone_meta = make_metadata(tables[seq : seq + 1], [position + 1], [1], BLOCK_SIZE)
        alone = backend.attend(query[row : row + 1], k_cache, v_cache, alone_meta, 0.125)
        assert torch.equal(alone[0], together[row]), row


def tree_rows_and_their_paths_decoded(
    backend: NativeAttentionBackend, prefix: int, tree_len: int, seed: int,
    window: int | None = None,
) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:  # (path, tree row, decode of path)
    """Attend a random tree of ``tree_len`` tokens after ``prefix`` cached ones; and, for
    each row, a decode of its token with its path (ancestors, then itself) moved to
    consecutive positions from ``prefix`` on, as plain decoding would have them."""
    query, k_cache, v_cache, metadata = make_step(
        [prefix + tree_len], [tree_len], seed=seed, tree_seqs=frozenset({0}),
        sliding_window=window,
    )  # fmt: skip
    mask = metadata.tree_mask
    assert mask is not None
    together = backend.attend(query, k_cache, v_cache, metadata, 0.125)
    table = metadata.block_tables[0]

    def slot(position: int) -> tuple[int, int]:
        return int(table[position // BLOCK_SIZE]), position % BLOCK_SIZE

    out = []
    for row in range(tree_len):
        path = [int(i) for i in torch.nonzero(mask[row]).flatten()]
        k_path, v_path = k_cache.clone(), v_cache.clone()
        for depth, node in enumerate(path):
            k_path[slot(prefix + depth)] = k_cache[slot(prefix + node)]
            v_path[slot(prefix + depth)] = v_cache[slot(prefix + node)]
        alone_meta = make_metadata(
            metadata.block_tables, [prefix + len(path)], [1], BLOCK_SIZE, sliding_window=window
        )
        alone = backend.attend(query[row : row + 1], k_path, v_path, alone_meta, 0.125)
        out.append((path, together[row], alone[0]))
    return out


@pytest.mark.parametrize("prefix", [37, 301])
def test_a_tree_row_gets_the_bits_of_decoding_its_path(kernels: NativeKernels, prefix: int) -> None:
    """A draft-tree row (its ancestors at scattered slots, siblings between them) equals
    a decode of its token with the ancestors' keys and values at consecutive positions,
    bit for bit: the softmax sum adds terms by position, not by slot. So the accepted
    rows of a verify are what plain decoding computes, and speculation keeps greedy
    output exactly. (A chain's slots are its positions: only branching trees test this.)"""
    backend = NativeAttentionBackend(kernels=kernels)
    rows = tree_rows_and_their_paths_decoded(backend, prefix, tree_len=12, seed=9)
    for path, in_tree, decoded in rows:
        assert torch.equal(in_tree, decoded), path
    # the random tree branches: rows whose path skips slots
    assert sum(path != list(range(len(path))) for path, _, _ in rows) >= 3


@pytest.mark.parametrize("window", [20, 3])
def test_a_tree_row_under_a_window_sees_what_a_decode_of_its_path_sees(
    kernels: NativeKernels, window: int
) -> None:
    """With a sliding window, a tree row (which the native backend hands to the torch
    reference) counts the window back from its depth's position, not its slot: it equals
    a decode of its path laid out at consecutive positions (a window of 3 also hides
    ancestors)."""
    backend = NativeAttentionBackend(kernels=kernels)
    rows = tree_rows_and_their_paths_decoded(backend, 45, tree_len=10, seed=11, window=window)
    for _, in_tree, decoded in rows:
        torch.testing.assert_close(in_tree, decoded, rtol=1e-5, atol=1e-5)
    assert sum(len(path) > 3 for path, _, _ in rows) >= 2  # paths past the smaller window


def test_a_float16_cache_read_in_place_gives_the_bits_of_its_float32_copy(
    kernels: NativeKernels,
) -> None:
    """The AVX-512 table reads a float16 cache in place, widening each vector as it loads
    it; the built table widens a block at a time into a copy. Either way a row gets the
    bits it gets over the cache's float32 copy (the same floats): decodes, chunks, a
    tree, a window."""
    from streamgen.native.qkernels import Isa, supported_isas

    isas = [Isa.AVX2] + ([Isa.AVX512VNNI] if Isa.AVX512VNNI in supported_isas() else [])
    for isa in isas if kernels.simd else [None]:
        backend = NativeAttentionBackend(max_native_chunk=32, kernels=kernels, isa=isa)
        for seed, kwargs in enumerate([dict(tree_seqs=frozenset({7})), dict(sliding_window=20)]):
            query, k16, v16, metadata = make_step(
                SEQ_LENS, QUERY_LENS, seed, dtype=torch.float16, **kwargs  # type: ignore[arg-type]
            )
            query = query.float()
            in_place = backend.attend(query, k16, v16, metadata, 0.125)
            copied = backend.attend(query, k16.float(), v16.float(), metadata, 0.125)
            assert torch.equal(in_place.float(), copied.float()), (isa, kwargs)

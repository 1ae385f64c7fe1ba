"""FlexAttentionBackend vs TorchReferenceBackend on whole steps.

One module-scoped backend compiles its two calls (decodes, packed extends)
once; every test after the first reuses them. Tests that need no compiled
kernel (page lists, fallbacks, probes) never compile.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from streamgen.attention.backend import AttentionMetadata
from streamgen.attention.flex import (
    FlexAttentionBackend,
    FlexUnavailableError,
    check_flex_available,
    flex_available,
)
from streamgen.attention.flex_plan import NO_WINDOW, PageListArena, block_to_logical, page_lists
from streamgen.attention.torch_ref import TorchReferenceBackend

sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))

from paged_kv_data import (
    make_cache,
    make_metadata,
    random_tree_mask,
    scattered_block_tables,
)

BLOCK_SIZE, NUM_BLOCKS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 16, 96, 4, 2, 16
SCALE = HEAD_DIM**-0.5
Step = tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]
needs_flex = pytest.mark.skipif(not flex_available("cpu"), reason="flex cannot compile here")


@pytest.fixture(scope="module")
def flex() -> FlexAttentionBackend:
    """Flex for every chunk up to 64 tokens, so the extend call is exercised too."""
    return FlexAttentionBackend(max_flex_chunk=64)


def make_step(
    seq_lens: list[int],
    query_lens: list[int],
    seed: int,
    *,
    sliding_window: int | None = None,
    tree_seqs: frozenset[int] = frozenset(),
) -> Step:
    """(query [tokens, heads, dim], k_cache, v_cache, metadata) over scattered blocks."""
    generator = torch.Generator().manual_seed(seed)
    cache = make_cache(
        NUM_BLOCKS,
        BLOCK_SIZE,
        NUM_KV_HEADS,
        HEAD_DIM,
        torch.float32,
        torch.device("cpu"),
        generator,
    )
    tables = scattered_block_tables(seq_lens, BLOCK_SIZE, NUM_BLOCKS, generator)
    tree_mask = random_tree_mask(query_lens, set(tree_seqs), generator) if tree_seqs else None
    metadata = make_metadata(
        tables, seq_lens, query_lens, BLOCK_SIZE, sliding_window=sliding_window, tree_mask=tree_mask
    )
    query = torch.randn(sum(query_lens), NUM_HEADS, HEAD_DIM, generator=generator)
    return query, cache.k_cache, cache.v_cache, metadata


def max_error(backend: FlexAttentionBackend, step: Step) -> float:
    query, k_cache, v_cache, metadata = step
    with torch.inference_mode():  # as in the model: grad mode is part of the compile guards
        out = backend.attend(query, k_cache, v_cache, metadata, SCALE)
        expected = TorchReferenceBackend().attend(query, k_cache, v_cache, metadata, SCALE)
    return float((out - expected).abs().max())


# Decodes at lengths 1, 15, 16, 17 (empty, partial and full last pages), prefill chunks
# from scratch and after a prefix, and a 6-token tree after 37 cached tokens.
MIXED_SEQ_LENS = [1, 15, 16, 17, 15, 40, 17, 43, 70]
MIXED_QUERY_LENS = [1, 1, 1, 1, 15, 16, 17, 6, 1]


@needs_flex
def test_mixed_batch_with_tree_matches_reference(flex: FlexAttentionBackend) -> None:
    step = make_step(MIXED_SEQ_LENS, MIXED_QUERY_LENS, seed=0, tree_seqs=frozenset({7}))
    assert max_error(flex, step) < 1e-5


@needs_flex
def test_causal_chunks_and_sliding_window_match_reference(flex: FlexAttentionBackend) -> None:
    step = make_step(MIXED_SEQ_LENS, MIXED_QUERY_LENS, seed=1)
    assert max_error(flex, step) < 1e-5
    step = make_step(MIXED_SEQ_LENS, MIXED_QUERY_LENS, seed=2, sliding_window=20)
    assert max_error(flex, step) < 1e-5


@needs_flex
def test_windowed_trees_count_the_window_from_each_nodes_depth(
    flex: FlexAttentionBackend,
) -> None:
    """A window over a tree counts back from the node's position, prefix + its depth,
    over the prefix and the node's ancestors at their depths (the reference's rule):
    windows that cut into the prefix (20) and into the trees themselves (2, 3). The
    16-node tree's nodes sit up to 15 slots past the prefix at depths of a few, so a
    window counted from the slots would hide most of their ancestors."""
    for seed, window in ((12, 20), (13, 3), (14, 2)):
        step = make_step(
            MIXED_SEQ_LENS, MIXED_QUERY_LENS, seed=seed, sliding_window=window,
            tree_seqs=frozenset({5, 7}),
        )  # fmt: skip
        assert max_error(flex, step) < 1e-5, window


@needs_flex
def test_default_routing_sends_long_chunks_to_the_reference(flex: FlexAttentionBackend) -> None:
    hybrid = FlexAttentionBackend()  # decodes by flex (same compiled call), chunks by torch
    step = make_step(MIXED_SEQ_LENS, MIXED_QUERY_LENS, seed=3, tree_seqs=frozenset({7}))
    assert max_error(hybrid, step) < 1e-5
    only_decodes = make_step([1], [1], seed=4)  # one sequence: padded to two tiles
    assert max_error(hybrid, only_decodes) < 1e-5



@needs_flex
def test_small_decode_groups_go_to_the_reference(flex: FlexAttentionBackend) -> None:
    routed = FlexAttentionBackend(max_flex_chunk=64, min_decode_keys=100)
    small = make_step([33, 2, 40], [1, 1, 1], seed=9)  # 75 keys: below the bar
    assert routed._step_plan(small[3], NUM_BLOCKS) is None  # the whole step is the reference's
    assert max_error(routed, small) < 1e-5
    large = make_step([33, 60, 40], [1, 1, 1], seed=10)  # 133 keys: flex
    plan = routed._step_plan(large[3], NUM_BLOCKS)
    assert plan is not None and plan.decode is not None and plan.decode.num_seqs == 3
    # Beside a chunk flex takes, the small decodes still go to the reference, in one step.
    mixed = make_step([33, 2, 40, 20], [1, 1, 1, 5], seed=11)
    plan = routed._step_plan(mixed[3], NUM_BLOCKS)
    assert plan is not None and plan.decode is None and plan.extend is not None
    assert plan.reference is not None and plan.reference.rows.tolist() == [0, 1, 2]
    assert max_error(routed, mixed) < 1e-5
    with pytest.raises(ValueError, match="min_decode_keys"):
        FlexAttentionBackend(min_decode_keys=-1)

@needs_flex
def test_new_lengths_and_batch_sizes_do_not_recompile(flex: FlexAttentionBackend) -> None:
    from torch._dynamo.utils import counters

    max_error(flex, make_step(MIXED_SEQ_LENS, MIXED_QUERY_LENS, seed=5))  # both calls compiled
    graphs = counters["stats"]["unique_graphs"]
    steps = [
        make_step([33, 2, 90, 48], [1, 1, 1, 1], seed=6),  # decodes only, other batch size
        make_step([5, 64, 31, 100, 9], [1, 20, 31, 3, 9], seed=7),  # other chunk mix
        make_step([60, 61], [2, 1], seed=8, tree_seqs=frozenset({0})),
    ]
    for step in steps:
        assert max_error(flex, step) < 1e-5
    assert counters["stats"]["unique_graphs"] == graphs


# ----- no compiled kernel below -----------------------------------------------------------
def test_page_lists_split_full_and_partial_pages() -> None:
    tables = torch.tensor([[7, 3, 5], [2, 0, 0], [4, 6, 1]])
    pos = torch.tensor([16, 15, 40])  # a decode at each position
    lists = page_lists(tables, pos, pos, BLOCK_SIZE, NO_WINDOW, PageListArena(), "t", 8)
    assert lists.num_full.tolist() == [1, 1, 2]
    assert lists.num_partial.tolist() == [1, 0, 1]
    assert lists.full[0, :1].tolist() == [7] and lists.partial[0, :1].tolist() == [3]
    assert lists.full[2, :2].tolist() == [4, 6] and lists.partial[2, :1].tolist() == [1]
    # A window of 20 at position 40 sees 21..40: page 1 partly, page 2 partly, page 0 not.
    windowed = page_lists(tables[2:], pos[2:], pos[2:], BLOCK_SIZE, 20, PageListArena(), "t", 8)
    assert windowed.num_full.tolist() == [0]
    assert sorted(windowed.partial[0, :2].tolist()) == [1, 6]
    empty = page_lists(
        tables[:1],
        torch.tensor([-1]),
        torch.tensor([-1]),
        BLOCK_SIZE,
        NO_WINDOW,
        PageListArena(),
        "t",
        8,
    )
    assert empty.num_full.tolist() == [0] and empty.num_partial.tolist() == [0]


def test_page_shared_at_two_positions_goes_to_reference() -> None:
    query, k_cache, v_cache, metadata = make_step([20, 20], [1, 1], seed=9)
    tables = metadata.block_tables.clone()
    tables[1] = tables[0].flip(0)  # the same two pages, in the other order
    metadata = make_metadata(tables, [20, 20], [1, 1], BLOCK_SIZE)
    assert block_to_logical(metadata, NUM_BLOCKS) is None
    out = FlexAttentionBackend().attend(query, k_cache, v_cache, metadata, SCALE)
    expected = TorchReferenceBackend().attend(query, k_cache, v_cache, metadata, SCALE)
    torch.testing.assert_close(out, expected)


def _failing_compile(*args: object, **kwargs: object) -> object:
    from torch._inductor.exc import CppCompileError

    def call(*call_args: object) -> torch.Tensor:
        raise CppCompileError(["g++"], "simulated compiler failure")

    return call


def test_compile_failure_raises_typed_error_or_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(FlexAttentionBackend, "_compiled_call", _failing_compile)
    monkeypatch.setattr(FlexAttentionBackend, "_check_device", lambda self, device: None)
    query, k_cache, v_cache, metadata = make_step([17, 3], [1, 1], seed=10)
    with pytest.raises(FlexUnavailableError, match="failed to compile"):
        FlexAttentionBackend().attend(query, k_cache, v_cache, metadata, SCALE)
    backend = FlexAttentionBackend(fallback_to_reference=True)
    out = backend.attend(query, k_cache, v_cache, metadata, SCALE)
    expected = TorchReferenceBackend().attend(query, k_cache, v_cache, metadata, SCALE)
    torch.testing.assert_close(out, expected)
    assert backend.disabled_reason is not None


@needs_flex
def test_probe_reports_a_missing_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.cpp_builder as cpp_builder

    def no_compiler() -> str:
        raise RuntimeError("no g++ here")

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    with pytest.raises(FlexUnavailableError, match="C\\+\\+ compiler"):
        check_flex_available("cpu")
    assert not flex_available("cpu")
    with pytest.raises(FlexUnavailableError):
        FlexAttentionBackend(device="cpu")
    FlexAttentionBackend(device="cpu", fallback_to_reference=True)  # logs, does not raise


def test_auto_picks_native_then_flex_for_real_models_and_torch_for_toys() -> None:
    from helpers import tiny_hf_config

    from streamgen.attention.auto import resolve_backend
    from streamgen.attention.native import NativeAttentionBackend
    from streamgen.model.config import ModelSpec
    from streamgen.native import native_kernels

    toy = ModelSpec.from_hf_config(tiny_hf_config())
    smollm2_sized = ModelSpec.from_hf_config(
        tiny_hf_config(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
        )
    )
    assert resolve_backend("torch", smollm2_sized, "cpu") == "torch"
    assert resolve_backend("auto", toy, "cpu") == "torch"
    chosen = resolve_backend("auto", smollm2_sized, "cpu")
    if native_kernels() is not None:
        assert isinstance(chosen, NativeAttentionBackend)
    elif flex_available("cpu"):
        assert isinstance(chosen, FlexAttentionBackend) and chosen.fallback_to_reference
    else:
        assert chosen == "torch"

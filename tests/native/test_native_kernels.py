"""The native CPU kernels against torch: linear layouts, RMSNorm, and whole decode steps.

Every test runs against both builds of the dense sources (``decode_kernels.c``,
``dense_linear.c``, ``attention.c``): the AVX2 + FMA one (where this CPU has them) and the
scalar one other CPUs get.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen.checkpoint.loader import load_model
from streamgen.model.native_decode import NativeDecoder
from streamgen.native import NativeKernels, NativeUnavailableError, native_kernels
from streamgen.native.build import build_library, load_library
from streamgen.native.kernels import native_linear
from streamgen.runner.batch import ModelBatch, SequenceChunk
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner
from streamgen.spec.tree import DraftTree

BLOCK_SIZE = 16
needs_native = pytest.mark.skipif(native_kernels() is None, reason="no C compiler here")


# ----- linear ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 25])
@pytest.mark.parametrize("out_features, in_features", [(64, 48), (37, 29), (6, 136)])
def test_linear_rows_layout_matches_torch(
    kernels: NativeKernels, dtype: torch.dtype, rows: int, out_features: int, in_features: int
) -> None:
    g = torch.Generator().manual_seed(rows * 1000 + out_features)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype)
    x = torch.randn(rows, in_features, generator=g)
    for b in (None, bias):
        y = torch.empty(rows, out_features)
        kernels.linear(native_linear(weight, b), x, y)
        expected = F.linear(x.double(), weight.double(), None if b is None else b.double())
        assert torch.allclose(y.double(), expected, atol=1e-4, rtol=1e-5)


def test_linear_refuses_column_slabs(kernels: NativeKernels) -> None:
    """The kernels take [out, in] weights only; the loader keeps that layout for them."""
    struct = native_linear(torch.randn(8, 4), None)
    struct.splits = 2
    with pytest.raises(RuntimeError, match="invalid arguments"):
        kernels.linear(struct, torch.randn(1, 4), torch.empty(1, 8))


def test_rms_norm_matches_torch(kernels: NativeKernels) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 77, generator=g) * 3
    for weight in (torch.randn(77, generator=g), torch.randn(77, generator=g).bfloat16()):
        expected = F.rms_norm(x, (77,), weight.float(), 1e-6)
        assert torch.allclose(kernels.rms_norm(x, weight, 1e-6), expected, atol=1e-5)


# ----- whole decode steps ----------------------------------------------------------------
CONFIGS = {
    "llama-gqa": ("llama", {}),
    "qwen2-bias-mha": ("qwen2", dict(num_key_value_heads=4)),
    "mistral-window": ("mistral", dict(sliding_window=24, head_dim=16)),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model_type, overrides = CONFIGS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    make_hf_checkpoint(path, tiny_hf_config(model_type, **overrides))
    return path


def _runner(checkpoint: Path, dtype: str, kv_dtype: torch.dtype | None = None) -> ModelRunner:
    loaded = load_model(checkpoint, dtype=dtype, load_tokenizer=False)
    return ModelRunner(loaded, KVCacheConfig(block_size=BLOCK_SIZE, num_blocks=48, dtype=kv_dtype))


def _prefill(runner: ModelRunner, prompts: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Prefill ``prompts`` on the torch path into scattered, unshared blocks; returns the
    greedy next tokens and the block tables."""
    runner.loaded.model.native_decoder = None
    tables = [[(7 * i + 5 * j) % 48 for j in range(6)] for i in range(len(prompts))]
    assert len({b for t in tables for b in t}) == sum(len(t) for t in tables)  # no shared block
    logits = runner.forward_logits(
        ModelBatch([SequenceChunk(str(i), p, 0, tables[i]) for i, p in enumerate(prompts)])
    )
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    return logits[ends].argmax(-1).tolist(), tables


def _decode_logits(
    runner: ModelRunner, decoder: NativeDecoder | None, prompts: list[list[int]], steps: int
) -> list[torch.Tensor]:
    """Prefill ``prompts`` (torch path) then ``steps`` decode steps of all of them
    together through ``decoder`` (None: the torch path); logits of every step."""
    tokens, tables = _prefill(runner, prompts)
    lengths = [len(p) for p in prompts]
    runner.loaded.model.native_decoder = decoder
    steps_logits = []
    for _ in range(steps):
        batch = ModelBatch([
            SequenceChunk(str(i), [tokens[i]], lengths[i], tables[i]) for i in range(len(prompts))
        ])
        out = runner.forward_logits(batch)
        steps_logits.append(out)
        tokens = out.argmax(-1).tolist()
        lengths = [n + 1 for n in lengths]
    return steps_logits


def _mixed_step_logits(
    runner: ModelRunner, decoder: NativeDecoder | None, with_tree: bool
) -> torch.Tensor:
    """One step after prefilling three prompts: a decode, a 9-token chunk continuing
    a prompt (crossing a block boundary), and a draft tree of 6 nodes (or a 7-token
    causal chunk); logits of every row."""
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (15, 12, 30)]
    tokens, tables = _prefill(runner, prompts)
    runner.loaded.model.native_decoder = decoder
    tree = DraftTree.from_paths([[11, 12, 13], [11, 14], [15, 16]]) if with_tree else None
    last = SequenceChunk("2", [tokens[2], *range(20, 26)], 30, tables[2])
    if tree is not None:
        last = SequenceChunk("2", [tokens[2], *tree.tokens], 30, tables[2], tree=tree)
    return runner.forward_logits(ModelBatch([
        SequenceChunk("0", [tokens[0]], 15, tables[0]),
        SequenceChunk("1", [tokens[1], *range(40, 48)], 12, tables[1]),
        last,
    ]))


@needs_native
@pytest.mark.parametrize("with_tree", [False, True])
def test_mixed_small_step_matches_torch_path(
    checkpoint: Path, kernels: NativeKernels, with_tree: bool
) -> None:
    """Decodes, a prefill chunk and a draft tree in one native step: the logits of
    every row (each tree node seeing only the prefix and its ancestors) within 1e-4."""
    if with_tree and "mistral" in checkpoint.name:
        pytest.skip("a sliding window does not combine with a tree mask")
    runner = _runner(checkpoint, "float32")
    decoder = NativeDecoder(runner.loaded.model, kernels)
    native = _mixed_step_logits(runner, decoder, with_tree)
    reference = _mixed_step_logits(runner, None, with_tree)
    assert native.shape[0] == 1 + 9 + 7
    assert (native - reference).abs().max() < 1e-4


@needs_native
def test_float16_kv_cache_is_written_and_read_as_torch_does(
    checkpoint: Path, kernels: NativeKernels
) -> None:
    """A float16 KV cache (a quantized model's default): the native step writes each
    K / V entry rounded to nearest float16 and reads it back widened. The torch path's
    K / V differ from the native step's in their last float32 bits, so after the same
    step the two caches agree entry for entry but for rare ties a float16 step or two
    apart (truncation would differ on about half). Logits within 1e-3 of the torch
    path: a tie that rounds the other way moves one of the step's own K / V entries by
    2^-11 of itself (measured: 2e-4)."""
    runner = _runner(checkpoint, "float32", torch.float16)
    assert runner.kv_cache.dtype == torch.float16
    decoder = NativeDecoder(runner.loaded.model, kernels)
    native = _mixed_step_logits(runner, decoder, with_tree=False)
    written = [(k.clone(), v.clone()) for k, v in runner.kv_cache.layers]
    reference = _mixed_step_logits(runner, None, with_tree=False)
    assert (native - reference).abs().max() < 1e-3
    ours = torch.cat([t.flatten() for pair in written for t in pair]).float()
    theirs = torch.cat([t.flatten() for pair in runner.kv_cache.layers for t in pair]).float()
    # a few float16 steps at most: later layers' K / V carry the earlier layers' ties
    torch.testing.assert_close(ours, theirs, rtol=2**-8, atol=1e-4)
    assert (ours != theirs).float().mean() < 0.01


@needs_native
def test_native_decoder_takes_only_small_steps(checkpoint: Path) -> None:
    runner = _runner(checkpoint, "float32")
    decoder = runner.loaded.model.native_decoder
    assert decoder is not None
    caches = runner.kv_cache.layers
    decode = runner.prepare(ModelBatch([SequenceChunk("a", [5], 3, [0])])).metadata
    assert decoder.accepts(decode, 1, caches)
    chunk = runner.prepare(ModelBatch([SequenceChunk("a", [5] * 32, 0, [0, 1])])).metadata
    assert decoder.accepts(chunk, 32, caches)
    prefill = runner.prepare(ModelBatch([SequenceChunk("a", [5] * 33, 0, [0, 1, 2])])).metadata
    assert not decoder.accepts(prefill, 33, caches)  # above MAX_NATIVE_ROWS: torch's matmuls
    half = [(k.half(), v.half()) for k, v in caches]
    assert decoder.accepts(decode, 1, half)  # float16 caches: a quantized model's default
    wide = [(k.double(), v.double()) for k, v in caches]
    assert not decoder.accepts(decode, 1, wide)  # a cache dtype the kernels do not read


# ----- building ------------------------------------------------------------------------------
@needs_native
def test_build_is_cached_by_source_flags_and_compiler(tmp_path: Path) -> None:
    first = build_library(tmp_path, "AVX2")
    stamp = first.stat().st_mtime_ns
    assert build_library(tmp_path, "AVX2") == first and first.stat().st_mtime_ns == stamp
    scalar = build_library(tmp_path, "DEFAULT")
    assert scalar != first
    assert not list(tmp_path.glob(".build-*"))  # no temporary build left behind


def test_disabled_by_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGEN_NATIVE", "0")
    with pytest.raises(NativeUnavailableError, match="STREAMGEN_NATIVE"):
        load_library()


def test_missing_compiler_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", os.fspath(tmp_path / "no-such-cc"))
    with pytest.raises(NativeUnavailableError, match="no C compiler"):
        build_library(tmp_path, "AVX2")


@needs_native
def test_layer_structs_follow_every_cache_address(checkpoint: Path) -> None:
    """A new cache may reuse some addresses of a freed one: any moved K or V cache
    rebuilds the structs (a stale V address once crashed a benchmark worker)."""
    runner = _runner(checkpoint, "float32")
    decoder = runner.loaded.model.native_decoder
    assert decoder is not None
    caches = runner.kv_cache.layers
    first = decoder._layers(caches)
    assert decoder._layers(caches) is first
    moved = [(k, v.clone()) for k, v in caches]  # same K addresses, new V addresses
    array = decoder._layers(moved)
    assert [layer.v_cache for layer in array] == [v.data_ptr() for _, v in moved]
    assert [layer.k_cache for layer in array] == [k.data_ptr() for k, _ in caches]

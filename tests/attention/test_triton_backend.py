"""TritonAttentionBackend vs TorchReferenceBackend on whole steps (write_kv + attend).

Without CUDA the kernels run under the Triton interpreter, which must be on
before ``streamgen.kernels`` is first imported: hence the set-up at the top.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))

from paged_kv_data import (
    FP8,
    make_cache,
    make_metadata,
    random_tree_mask,
    scattered_block_tables,
    tree_rows_by_torch_backend,
)

from streamgen.attention.backend import AttentionMetadata
from streamgen.attention.torch_ref import TorchReferenceBackend
from streamgen.attention.triton_backend import TritonAttentionBackend
from streamgen.kernels.reference import reshape_and_cache_reference

BLOCK_SIZE, HEAD_DIM, NUM_BLOCKS, NUM_HEADS, NUM_KV_HEADS = 8, 16, 24, 4, 2
# decode, prefill chunk over a prefix, decode, fresh prompt, tree chunk, decode
SEQ_LENS = [9, 20, 1, 7, 17, 40]
QUERY_LENS = [1, 5, 1, 7, 6, 1]
TREE_SEQ = 4
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, FP8: 2e-5}


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _run_step(
    device: torch.device,
    cache_dtype: torch.dtype,
    seq_lens: list[int],
    query_lens: list[int],
    *,
    tree: bool = False,
    sliding_window: int | None = None,
    partition_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, tuple[torch.Tensor, ...]]:
    """One layer of one step through both backends, from identical caches.

    Returns (triton output, torch output, metadata, (q, triton k/v caches, torch k/v caches)).
    """
    generator = torch.Generator().manual_seed(sum(seq_lens))
    cache = make_cache(
        NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, cache_dtype, device, generator
    )
    tables = scattered_block_tables(seq_lens, BLOCK_SIZE, NUM_BLOCKS, generator).to(device)
    tree_mask = random_tree_mask(query_lens, {TREE_SEQ}, generator).to(device) if tree else None
    metadata = make_metadata(
        tables, seq_lens, query_lens, BLOCK_SIZE, sliding_window=sliding_window, tree_mask=tree_mask
    )
    model_dtype = torch.float32 if cache_dtype == FP8 else cache_dtype
    # q, k, v as strided slices of one fused projection, as the model passes them.
    num_tokens = metadata.num_tokens
    fused = torch.randn(num_tokens, NUM_HEADS + 2 * NUM_KV_HEADS, HEAD_DIM, generator=generator)
    fused = fused.to(model_dtype).to(device)
    query = fused[:, :NUM_HEADS]
    key = fused[:, NUM_HEADS : NUM_HEADS + NUM_KV_HEADS]
    value = fused[:, NUM_HEADS + NUM_KV_HEADS :]

    triton_backend = TritonAttentionBackend(decode_partition_size=partition_size)
    torch_backend = TorchReferenceBackend()
    caches = {}
    outputs = {}
    for name, backend in (("triton", triton_backend), ("torch", torch_backend)):
        k_cache, v_cache = cache.k_cache.clone(), cache.v_cache.clone()
        backend.prepare(metadata)
        if name == "torch" and cache_dtype == FP8:
            # The torch backend cannot index_copy_ into fp8 on the CPU: write with the
            # reference (unit scales, as the triton backend uses), attend in float32.
            unit = torch.ones(NUM_KV_HEADS, device=device)
            slots = metadata.slot_mapping
            reshape_and_cache_reference(key, value, k_cache, v_cache, slots, unit, unit)
            read_k, read_v = k_cache.float(), v_cache.float()
        else:
            backend.write_kv(key, value, k_cache, v_cache, metadata)
            read_k, read_v = k_cache, v_cache
        outputs[name] = backend.attend(query, read_k, read_v, metadata, HEAD_DIM**-0.5)
        caches[name] = (k_cache, v_cache)
    return (
        outputs["triton"],
        outputs["torch"],
        metadata,
        (query, *caches["triton"], *caches["torch"]),
    )


def _max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    return (actual.float() - expected.float()).abs().max().item()


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, FP8], ids=str)
def test_mixed_batch_matches_torch_backend(device: torch.device, cache_dtype: torch.dtype) -> None:
    out, expected, metadata, (query, k, v, ref_k, ref_v) = _run_step(
        device, cache_dtype, SEQ_LENS, QUERY_LENS, tree=True
    )
    # The caches after write_kv are identical (fp8: unit scale, saturating).
    assert torch.equal(k.view(torch.uint8), ref_k.view(torch.uint8))
    assert torch.equal(v.view(torch.uint8), ref_v.view(torch.uint8))
    start = sum(QUERY_LENS[:TREE_SEQ])
    tree_rows = list(range(start, start + QUERY_LENS[TREE_SEQ]))
    other_rows = [row for row in range(metadata.num_tokens) if row not in tree_rows]
    assert _max_error(out[other_rows], expected[other_rows]) <= TOLERANCE[cache_dtype]
    # Tree rows: TorchReferenceBackend with one-slot blocks (no reliance on its tree support).
    if cache_dtype == FP8:
        ref_k, ref_v = ref_k.float(), ref_v.float()
    tree_expected = tree_rows_by_torch_backend(
        query, ref_k, ref_v, metadata, tree_rows, HEAD_DIM**-0.5
    )
    assert _max_error(out[tree_rows], tree_expected) <= TOLERANCE[cache_dtype]


def test_tree_rows_match_torch_backend_tree_support(device: torch.device) -> None:
    out, expected, _, _ = _run_step(device, torch.float32, SEQ_LENS, QUERY_LENS, tree=True)
    assert _max_error(out, expected) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("partition_size", [16, 512], ids=["split_k", "one_partition"])
def test_all_decodes(device: torch.device, partition_size: int) -> None:
    lens = [1, BLOCK_SIZE - 1, BLOCK_SIZE, BLOCK_SIZE + 1, 50]
    out, expected, _, _ = _run_step(
        device, torch.float32, lens, [1] * len(lens), partition_size=partition_size
    )
    assert _max_error(out, expected) <= TOLERANCE[torch.float32]


def test_all_extends_with_sliding_window(device: torch.device) -> None:
    out, expected, _, _ = _run_step(
        device, torch.float32, [12, 30, 5], [12, 9, 2], sliding_window=6
    )
    assert _max_error(out, expected) <= TOLERANCE[torch.float32]


def test_mixed_batch_with_sliding_window(device: torch.device) -> None:
    out, expected, _, _ = _run_step(
        device, torch.float32, SEQ_LENS, QUERY_LENS, sliding_window=5, partition_size=16
    )
    assert _max_error(out, expected) <= TOLERANCE[torch.float32]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_bf16_mixed_batch_on_gpu() -> None:
    out, expected, _, _ = _run_step(torch.device("cuda"), torch.bfloat16, SEQ_LENS, QUERY_LENS)
    assert _max_error(out, expected) <= TOLERANCE[torch.bfloat16]


_PREPARE_ON_CPU = """
import torch
from streamgen.attention.backend import AttentionMetadata
from streamgen.attention.triton_backend import TritonAttentionBackend
from streamgen.errors import BackendUnavailableError

metadata = AttentionMetadata(
    slot_mapping=torch.zeros(1, dtype=torch.int64),
    query_start_loc=torch.tensor([0, 1]),
    seq_lens=torch.tensor([1]),
    block_tables=torch.zeros(1, 1, dtype=torch.int64),
    query_lens_list=(1,),
    seq_lens_list=(1,),
    block_size=16,
)
try:
    TritonAttentionBackend().prepare(metadata)
except BackendUnavailableError as error:
    print("BackendUnavailableError:", error)
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU without the interpreter")
def test_cpu_tensors_without_interpreter_raise_typed_error() -> None:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", _PREPARE_ON_CPU],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "BackendUnavailableError: the triton backend needs a CUDA device" in result.stdout


FAMILY_CONFIGS = {  # tiny configs of each family (16-dim heads: the kernels' tiles)
    "qwen3": dict(head_dim=16),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.4,
                    attention_multiplier=0.2, logits_scaling=2.5),
    "olmo2": dict(),
    "phi3": dict(pad_token_id=0, partial_rotary_factor=0.75),
    "gemma3_text": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gemma2": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),  # soft-capped
}


@pytest.mark.parametrize("family", list(FAMILY_CONFIGS))
def test_model_families_through_the_triton_backend(tmp_path: Path, family: str) -> None:
    """A prefill and 3 decodes of each family through the Triton kernels give the torch
    reference backend's logits (the native decoder set aside, so every step reaches the
    backend)."""
    from helpers import make_hf_checkpoint, tiny_hf_config

    from streamgen import load_model
    from streamgen.runner.batch import ModelBatch, SequenceChunk
    from streamgen.runner.kv_cache import KVCacheConfig
    from streamgen.runner.model_runner import ModelRunner

    make_hf_checkpoint(tmp_path, tiny_hf_config(family, **FAMILY_CONFIGS[family]))
    loaded = load_model(tmp_path, load_tokenizer=False)
    loaded.model.native_decoder = None
    prompt = list(range(3, 25))
    rows = {}
    for name in ("triton", "torch"):
        runner = ModelRunner(loaded, KVCacheConfig(block_size=8, num_blocks=8), backend=name)
        tokens, table = list(prompt), [5, 1, 6, 2]
        steps = [runner.forward_logits(ModelBatch([SequenceChunk("r", tokens, 0, table)]))[-1]]
        for _ in range(3):
            tokens.append(int(steps[-1].argmax()))
            chunk = SequenceChunk("r", tokens[-1:], len(tokens) - 1, table)
            steps.append(runner.forward_logits(ModelBatch([chunk]))[-1])
        rows[name] = torch.stack(steps)
    assert (rows["triton"] - rows["torch"]).abs().max().item() < 1e-4

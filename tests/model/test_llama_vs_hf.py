"""streamgen's forward against HF transformers' own model classes on the same weights.

Each test runs a prompt (several KV blocks long) as one prefill, then 20
decode steps, through the paged cache, and compares every logit row with
HF's full-sequence forward in float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen.checkpoint.loader import load_model
from streamgen.runner.batch import ModelBatch, SequenceChunk
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner

TOLERANCE = 1e-4
BLOCK_SIZE = 16

# Granite's four scales, away from 1 (Granite-3 uses 12 / 0.22 / 0.0078 / 8)
GRANITE = dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.2,
               logits_scaling=2.5)  # fmt: skip
# 16-dim heads (tiny_hf_config), 0.75 of them rotated: 12 dims, 6 frequencies
PHI_LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.3, 2.1, 3.0, 4.2, 5.0],
                "long_factor": [1.0, 1.5, 2.5, 4.0, 6.5, 9.0]}  # fmt: skip
# Two sliding-window layers (a window of 8, crossed by the 37-token prompt) around a
# global one, each with its rope base; scores scaled by 24 ** -0.5, not head_dim's
GEMMA3 = dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24, tie_word_embeddings=True,
              layer_types=["sliding_attention", "full_attention", "sliding_attention"])  # fmt: skip
CONFIGS = {
    "llama-gqa-llama3-rope": (
        "llama",
        dict(
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "llama-tied-mha": ("llama", dict(tie_word_embeddings=True, num_key_value_heads=4)),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=True)),
    # q_size (4 x 24) differs from hidden (64), as in Qwen3-0.6B (16 x 128 vs 1024)
    "qwen3-qk-norm": ("qwen3", dict(head_dim=24, tie_word_embeddings=True)),
    "granite-multipliers": ("granite", GRANITE),
    "olmo2-post-norms": ("olmo2", dict()),
    "phi3-fused": ("phi3", dict(pad_token_id=0)),
    "gemma3-local-global": ("gemma3_text", GEMMA3),
    # soft-capped scores and logits, caps small enough to bite
    "gemma2-softcaps": ("gemma2", dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                                       attn_logit_softcapping=2.0, final_logit_softcapping=3.0)),
    "gemma3-softcap": ("gemma3_text", dict(GEMMA3, final_logit_softcapping=3.0)),
    # Phi-4-mini's shape: 3/4 of each head rotated, longrope (short factors below 192)
    "phi3-partial-longrope": ("phi3", dict(pad_token_id=0, partial_rotary_factor=0.75,
                              rope_scaling=PHI_LONGROPE, original_max_position_embeddings=192)),
    "mistral-sliding-window": ("mistral", dict(sliding_window=24, head_dim=16)),
}


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def run_prefill_and_decode(runner, hf_model, prompt, num_decode=20, request_id="r"):
    """Returns the max abs logit diff over the prefill and each decode step."""
    free_blocks = iter(range(runner.num_blocks))
    tokens = list(prompt)
    blocks = [next(free_blocks) for _ in range(-(-len(tokens) // BLOCK_SIZE))]
    ours = runner.forward_logits(ModelBatch([SequenceChunk(request_id, tokens, 0, blocks)]))
    diffs = [(ours - hf_logits(hf_model, tokens)).abs().max().item()]
    for _ in range(num_decode):
        tokens.append(int(ours[-1].argmax()))
        if len(blocks) * BLOCK_SIZE < len(tokens):
            blocks.append(next(free_blocks))
        chunk = SequenceChunk(request_id, tokens[-1:], len(tokens) - 1, blocks)
        ours = runner.forward_logits(ModelBatch([chunk]))
        diffs.append((ours[-1] - hf_logits(hf_model, tokens)[-1]).abs().max().item())
    return diffs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_hf_prefill_and_decode(tmp_path: Path, name: str) -> None:
    """The decodes run in the one-call native step wherever the kernels build (every
    family, Gemma 2's soft-capped attention scores too), so they are that path's logits."""
    from streamgen.native import native_kernels

    model_type, overrides = CONFIGS[name]
    hf_model = make_hf_checkpoint(tmp_path, tiny_hf_config(model_type, **overrides))
    loaded = load_model(tmp_path, dtype="float32", load_tokenizer=False)
    if native_kernels() is not None:
        assert loaded.model.native_decoder is not None
    runner = ModelRunner(loaded, KVCacheConfig(block_size=BLOCK_SIZE, num_blocks=32))
    prompt = torch.randint(3, 200, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    diffs = run_prefill_and_decode(runner, hf_model, prompt)
    assert max(diffs) < TOLERANCE, diffs


def test_mixed_batch_matches_single_sequence_runs(tmp_path: Path) -> None:
    """Prefill chunks and decodes of different sequences in one step give the
    same logits as each sequence alone (scattered physical blocks)."""
    hf_model = make_hf_checkpoint(tmp_path, tiny_hf_config("llama"))
    loaded = load_model(tmp_path, load_tokenizer=False)
    runner = ModelRunner(loaded, KVCacheConfig(block_size=BLOCK_SIZE, num_blocks=64))
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (5, 16, 17, 40)]
    # Interleave allocations so each sequence's blocks are scattered in memory.
    tables: list[list[int]] = [[] for _ in prompts]
    num_allocated = 0
    for round_ in range(4):
        for i, p in enumerate(prompts):
            if round_ < -(-(len(p) + 2) // BLOCK_SIZE):
                tables[i].append(num_allocated * 7 % 64)
                num_allocated += 1
    all_blocks = [b for t in tables for b in t]
    assert len(set(all_blocks)) == len(all_blocks) == num_allocated

    # Step 1: seq 0 and 1 prefill fully, seq 2 prefills its first 9 tokens, seq 3 its first 33.
    step1 = [
        SequenceChunk("0", prompts[0], 0, tables[0]),
        SequenceChunk("1", prompts[1], 0, tables[1]),
        SequenceChunk("2", prompts[2][:9], 0, tables[2]),
        SequenceChunk("3", prompts[3][:33], 0, tables[3]),
    ]
    runner.forward_logits(ModelBatch(step1))
    # Step 2: decodes for 0 and 1, the rest of the prefills for 2 and 3, all in one batch.
    nxt0, nxt1 = 7, 11
    step2 = [
        SequenceChunk("2", prompts[2][9:], 9, tables[2]),
        SequenceChunk("0", [nxt0], len(prompts[0]), tables[0]),
        SequenceChunk("3", prompts[3][33:], 33, tables[3]),
        SequenceChunk("1", [nxt1], len(prompts[1]), tables[1]),
    ]
    out = runner.forward_logits(ModelBatch(step2))
    rows = torch.tensor([c.num_tokens for c in step2]).cumsum(0) - 1
    expected = [
        hf_logits(hf_model, prompts[2])[-1],
        hf_logits(hf_model, [*prompts[0], nxt0])[-1],
        hf_logits(hf_model, prompts[3])[-1],
        hf_logits(hf_model, [*prompts[1], nxt1])[-1],
    ]
    for row, exp in zip(rows.tolist(), expected, strict=True):
        assert (out[row] - exp).abs().max().item() < TOLERANCE
    # Every row of the chunked prefill of seq 3 matches, not only the last.
    full3 = hf_logits(hf_model, prompts[3])[33:]
    assert (out[rows[1] + 1 : rows[2] + 1] - full3).abs().max().item() < TOLERANCE


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_dtypes_track_float32(tmp_path: Path, dtype: str) -> None:
    hf_model = make_hf_checkpoint(tmp_path, tiny_hf_config("llama"))
    loaded = load_model(tmp_path, dtype=dtype, load_tokenizer=False)
    assert loaded.model.embed_tokens.weight.dtype == getattr(torch, dtype)
    runner = ModelRunner(loaded, KVCacheConfig(num_blocks=8))
    prompt = list(range(3, 40))
    ours = runner.forward_logits(ModelBatch([SequenceChunk("r", prompt, 0, [0, 1, 2])]))
    ref = hf_logits(hf_model, prompt)
    # Low precision: close in relative terms, and the same argmax almost everywhere.
    assert (ours - ref).abs().max().item() < 0.05 * ref.abs().max().item()
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9

"""The real default model (SmolLM2-135M-Instruct) against HF transformers on the same weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from streamgen import OfflineGenerator, SamplingParams, load_model
from streamgen.runner.batch import ModelBatch, SequenceChunk
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner

pytestmark = pytest.mark.real_model

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain what a hash table is to a beginner.",
    "List three tips for writing clean Python code.",
    "How many legs does a spider have, and why?",
]


@pytest.fixture(scope="module")
def loaded(default_model_dir: Path):
    return load_model(default_model_dir, dtype="float32")


@pytest.fixture(scope="module")
def hf_model(default_model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32).eval()


def chat_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )


def test_logits_match_hf_over_prefill_and_20_decodes(loaded, hf_model) -> None:
    runner = ModelRunner(loaded, KVCacheConfig(num_blocks=16))
    free_blocks = iter(range(runner.num_blocks))
    tokens = chat_ids(loaded.tokenizer, CHAT_PROMPTS[2])
    blocks = [next(free_blocks) for _ in range(-(-len(tokens) // 16))]
    ours = runner.forward_logits(ModelBatch([SequenceChunk("r", tokens, 0, blocks)]))
    with torch.no_grad():
        ref = hf_model(torch.tensor([tokens])).logits[0]
    diffs = [(ours - ref).abs().max().item()]
    for _ in range(20):
        tokens.append(int(ours[-1].argmax()))
        if len(blocks) * 16 < len(tokens):
            blocks.append(next(free_blocks))
        ours = runner.forward_logits(
            ModelBatch([SequenceChunk("r", tokens[-1:], len(tokens) - 1, blocks)])
        )
        with torch.no_grad():
            ref = hf_model(torch.tensor([tokens])).logits[0, -1]
        diffs.append((ours[-1] - ref).abs().max().item())
    assert max(diffs) < 1e-4, diffs


def test_greedy_64_tokens_equal_hf_generate(loaded, hf_model) -> None:
    generator = OfflineGenerator(loaded, KVCacheConfig(num_blocks=64))
    # HF min_new_tokens masks EOS; min_tokens does the same here.
    params = SamplingParams(temperature=0, max_tokens=64, min_tokens=64)
    prompts = [chat_ids(loaded.tokenizer, p) for p in CHAT_PROMPTS]
    ours = generator.generate(prompts, params)
    for prompt, out in zip(prompts, ours, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=64, min_new_tokens=64, do_sample=False
            )[0, len(prompt) :].tolist()
        assert out == ref, loaded.tokenizer.decode(out) + " != " + loaded.tokenizer.decode(ref)
    assert generator.blocks.num_free_blocks == generator.blocks.num_total_blocks


def test_output_alone_equals_output_in_a_batch_of_8(loaded) -> None:
    generator = OfflineGenerator(loaded, KVCacheConfig(num_blocks=256))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    long_context = " ".join(f"Item {i}: the {i}th entry of the inventory list." for i in range(12))
    texts = [
        f"{long_context}\nWhich item number comes right after item 7?",  # several blocks
        "Hi!",
        "Name a color.",
        CHAT_PROMPTS[0],
        CHAT_PROMPTS[3],
        "Count from one to ten in French.",
        long_context[:300] + " Summarise.",
        "Why is the ocean salty?",
    ]
    prompts = [chat_ids(loaded.tokenizer, t) for t in texts]
    assert len(prompts[0]) > 5 * 16
    assert len({len(p) for p in prompts}) == len(prompts)
    batched = generator.generate(prompts, params)
    for prompt, out in zip(prompts, batched, strict=True):
        assert generator.generate([prompt], params)[0] == out

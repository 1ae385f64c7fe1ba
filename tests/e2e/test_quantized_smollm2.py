"""The default model served from its GGUF on the quantized path (Q4_1 weights, Q8_0
embeddings and LM head, int8 activations), against the dense float32 model built from
the same file (its values dequantized exactly, the path HF transformers agrees with).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from streamgen import OfflineGenerator, SamplingParams, load_model
from streamgen.checkpoint import default_gguf_path
from streamgen.engine import Engine, EngineConfig
from streamgen.model.linear import Linear
from streamgen.model.quantized import kernel_context
from streamgen.runner.batch import ModelBatch, SequenceChunk
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner
from streamgen.spec.config import SpeculationConfig

pytestmark = pytest.mark.real_model

TEXT = (
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in "
    "1889 for the World's Fair. Paris is also famous for its museums, such as the Louvre, "
    "which houses the Mona Lisa. What is the capital of France? The capital of France is"
)


@pytest.fixture(scope="module")
def gguf_path(default_model_dir: Path) -> Path:
    return default_gguf_path(progress=False)


@pytest.fixture(scope="module")
def quantized(gguf_path: Path):
    return load_model(gguf_path, threads=1)


@pytest.fixture(scope="module")
def dense(default_model_dir: Path):
    return load_model(default_model_dir, quantization=None)


def chat_ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
        return_dict=False,
    ))  # fmt: skip


def test_packed_weights_hold_the_files_values(quantized, dense) -> None:
    """Every linear layer (q/k rows unpermuted, q/k/v and gate/up fused) and the
    embeddings dequantize to exactly the dense checkpoint's float32 values."""
    for name, module in quantized.model.named_modules():
        if isinstance(module, Linear) and name != "lm_head":
            assert module.packed is not None, name
            torch.testing.assert_close(
                module.packed.dequantize(), dense.model.get_submodule(name).weight,
                rtol=0, atol=0, msg=name,
            )  # fmt: skip
    ids = torch.arange(0, quantized.spec.vocab_size, 997)
    assert torch.equal(quantized.model.embed_tokens(ids), dense.model.embed_tokens(ids))


def _fake_quant(x: torch.Tensor) -> torch.Tensor:  # the kernels' int8 activations, in float
    blocks = x.float().reshape(*x.shape[:-1], -1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv).clamp(-127, 127) * d).reshape(x.shape)


def test_first_layer_is_the_same_arithmetic(quantized, dense) -> None:
    """One layer, both through the torch path, against the dense layer fed int8-rounded
    inputs (the same arithmetic in float32): what is left is fp32 summation order and
    the rare rounding that lands on the other side of a half step, so 1e-3 of the hidden
    state's norm is ample (measured 4e-5). (The native path is checked by the logit test:
    its fp32 norm and attention differ from torch's by ~1e-7, which moves an int8
    rounding now and then; the embeddings, themselves int8 values, put many inputs on
    exact half steps.)"""
    ids = quantized.tokenizer.encode(TEXT)[:40]
    layer = dense.model.layers[0]
    saved = {}
    for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
        linear = layer.get_submodule(name)
        saved[name] = linear.forward
        linear.forward = (lambda f: lambda x: f(_fake_quant(x)))(linear.forward)
    decoder = quantized.model.native_decoder
    decoder.max_rows = 0  # the torch path
    try:
        hidden = []
        for loaded in (quantized, dense):
            # float32 caches for both: the quantized model's float16 default would add
            # its own rounding to the arithmetic compared here
            kv = KVCacheConfig(block_size=16, num_blocks=8, dtype=torch.float32)
            runner = ModelRunner(loaded, kv)
            inputs = runner.prepare(ModelBatch([SequenceChunk("r", ids, 0, [0, 1, 2])]))
            hidden.append(loaded.model(
                inputs.input_ids, inputs.positions, runner.kv_cache.layers[:1], inputs.metadata,
                runner.backend, num_layers=1,
            ))  # fmt: skip
    finally:
        decoder.max_rows = None
        for name, forward in saved.items():
            layer.get_submodule(name).forward = forward
    assert ((hidden[0] - hidden[1]).norm() / hidden[1].norm()).item() < 1e-3


def _teacher_forced(loaded, ids: list[int], prefill: int) -> torch.Tensor:
    # -> [len(ids), vocab]: a prefill of `prefill` tokens, then one decode per token
    runner = ModelRunner(loaded, KVCacheConfig(block_size=16, num_blocks=12))
    table = list(range(12))
    out = [runner.forward_logits(ModelBatch([SequenceChunk("r", ids[:prefill], 0, table)]))]
    for pos in range(prefill, len(ids)):  # decodes
        out.append(runner.forward_logits(ModelBatch([SequenceChunk("r", [ids[pos]], pos, table)])))
    return torch.cat(out)


def test_logits_track_the_dense_model(quantized, dense) -> None:
    """Teacher-forced over real text, prefill and decodes. int8 activations with one
    scale per 32 inputs round each input by up to amax / 254 of its block; on SmolLM2,
    whose hidden states carry outliers 20x the typical entry, that is ~0.5% noise per
    matmul, compounding over 120 matmuls to a few percent of the final hidden state
    (the regime of llama.cpp's own Q8 activations). Measured: top-1 agreement 95%, mean
    KL 0.0025 nats; the bounds allow 2x and 4x that."""
    ids = quantized.tokenizer.encode(TEXT)
    q, d = (_teacher_forced(m, ids, prefill=40) for m in (quantized, dense))
    agreement = (q.argmax(-1) == d.argmax(-1)).float().mean().item()
    log_d, log_q = torch.log_softmax(d, -1), torch.log_softmax(q, -1)
    kl = (log_d.exp() * (log_d - log_q)).sum(-1).mean().item()
    assert agreement >= 0.9 and kl <= 0.01, (agreement, kl)


def test_alone_equals_in_a_batch_of_8_and_under_preemption(quantized) -> None:
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    long_context = " ".join(f"Item {i}: the {i}th entry of the inventory list." for i in range(12))
    texts = [
        f"{long_context}\nWhich item number comes right after item 7?",
        "Hi!",
        "Name a color.",
        "What is the capital of France?",
        "Count from one to ten in French.",
        long_context[:300] + " Summarise.",
        "Why is the ocean salty?",
        "Tell me a joke.",
    ]
    prompts = [chat_ids(quantized.tokenizer, t) for t in texts]
    generator = OfflineGenerator(quantized, KVCacheConfig(num_blocks=256))
    alone = [generator.generate([p], params)[0] for p in prompts]
    assert generator.generate(prompts, params) == alone
    tight = OfflineGenerator(quantized, KVCacheConfig(num_blocks=24))  # forces preemption
    assert tight.generate(prompts, params) == alone
    assert (
        tight.blocks.num_free_blocks + tight.blocks.num_cached_blocks
        == tight.blocks.num_total_blocks
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_layer_inputs_equal_quantized_finished_rows(gguf_path: Path, threads: int) -> None:
    """The native step quantizes each layer's input as the norm / SwiGLU make it
    (fuse_inputs): bit for bit the hidden states of quantizing the finished float rows,
    at decode sizes and at a prefill whose rows are split over the pool (>= 16)."""
    loaded = load_model(gguf_path, threads=threads, load_tokenizer=False)
    decoder = loaded.model.native_decoder
    assert decoder is not None
    ids = [(7 * i + 3) % 40000 + 100 for i in range(40)]
    hidden = []
    for fuse in (1, 0):
        decoder.struct.fuse_inputs = fuse
        runner = ModelRunner(loaded, KVCacheConfig(block_size=16, num_blocks=8))
        table = list(range(8))
        inputs = runner.prepare(ModelBatch([SequenceChunk("r", ids[:37], 0, table)]))
        rows = [runner.forward_hidden(inputs)]  # 37 rows: pooled
        for pos in (37, 38):  # 1 row, then 2 (a short chunk)
            chunk = SequenceChunk("r", ids[pos : pos + 1 + (pos - 37)], pos, table)
            rows.append(runner.forward_hidden(runner.prepare(ModelBatch([chunk]))))
        hidden.append(torch.cat(rows))
    decoder.struct.fuse_inputs = 1
    assert torch.equal(hidden[0], hidden[1])


def test_one_and_two_threads_give_the_same_tokens(gguf_path: Path, quantized) -> None:
    two = load_model(gguf_path, threads=2)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    prompts = [chat_ids(quantized.tokenizer, t) for t in ("Why is the sky blue?", "Hello")]
    assert OfflineGenerator(two).generate(prompts, params) == OfflineGenerator(quantized).generate(
        prompts, params
    )


def test_resident_weights_within_a_quarter_of_the_file(gguf_path: Path, quantized) -> None:
    """Every weight byte the model holds (the tied LM head shares the embedding's)."""
    tensors = {}
    for module in quantized.model.modules():
        parts = []
        if isinstance(module, Linear) and module.packed is not None:
            parts = list(module.packed.parts)
        elif hasattr(module, "packed"):
            parts = [module.packed]
        for part in parts:
            for t in (part.data, part.bias):
                if t is not None:
                    tensors[t.data_ptr()] = t.numel() * t.element_size()
    for p in quantized.model.parameters():
        tensors[p.data_ptr()] = p.numel() * p.element_size()
    resident = sum(tensors.values())
    assert resident <= 1.25 * gguf_path.stat().st_size, (resident, gguf_path.stat().st_size)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_speculation_keeps_greedy_output_on_the_quantized_path(quantized) -> None:
    prompt = chat_ids(
        quantized.tokenizer, "Repeat exactly: the quick brown fox jumps over the lazy dog. " * 3
    )
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    outputs = []
    for speculation in (None, SpeculationConfig(method="ngram", adaptive=False)):
        config = EngineConfig(kv_cache_bytes=64 << 20, max_model_len=1024, speculation=speculation)
        async with Engine(quantized, config) as engine:
            outputs.append([e.token_id async for e in engine.stream(prompt, params)])
            stats = engine.stats()
    assert outputs[0] == outputs[1]
    assert stats["speculation"]["accepted_tokens"] > 0


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_engine_gives_a_loaded_model_its_threads(gguf_path: Path, quantized) -> None:
    """EngineConfig.threads sizes the kernel pool of a model loaded with another count
    (it used to keep the load's pool: every CPU), with the same tokens."""
    loaded = load_model(gguf_path, threads=1, load_tokenizer=False)
    context = kernel_context(loaded.model)
    assert context is not None and context.threads == 1
    prompt = chat_ids(quantized.tokenizer, "Name three colours.")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    tokens = []
    for threads in (2, 1):
        config = EngineConfig(threads=threads, kv_cache_bytes=64 << 20, max_model_len=1024)
        async with Engine(loaded, config) as engine:
            assert context.threads == threads
            tokens.append([e.token_id async for e in engine.stream(prompt, params)])
    assert tokens[0] == tokens[1] == OfflineGenerator(quantized).generate([prompt], params)[0]


def test_quantize_at_load_uses_llama_cpp_rounding(default_model_dir: Path, dense) -> None:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    q8 = load_model(default_model_dir, quantization="q8_0", threads=1)
    weight = dense.model.layers[3].mlp.down_proj.weight.numpy()
    expected = dequantize(quantize(weight, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    got = q8.model.layers[3].mlp.down_proj.packed.dequantize().numpy()
    np.testing.assert_array_equal(got, expected)
    ids = q8.tokenizer.encode(TEXT)
    runners = [ModelRunner(m, KVCacheConfig(block_size=16, num_blocks=8)) for m in (q8, dense)]
    batch = ModelBatch([SequenceChunk("r", ids, 0, list(range(8)))])
    q, d = (runner.forward_logits(batch) for runner in runners)
    assert (q.argmax(-1) == d.argmax(-1)).float().mean().item() >= 0.9


def test_q4_k_at_load_falls_back_as_llama_quantize_does(default_model_dir: Path, dense) -> None:
    """SmolLM2's 576-wide rows do not split into Q4_K's 256-value blocks: those tensors
    take Q5_0 (gguf's quantizer), the 1536-wide down projections Q4_K (native/kquant.c,
    whose bytes tests/checkpoint/test_quantize_q4_k.py checks)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from streamgen.checkpoint.gguf_quants import QuantType

    q4k = load_model(default_model_dir, quantization="q4_k", threads=2)
    layer = q4k.model.layers[3]
    assert [p.qtype for p in layer.mlp.down_proj.packed.parts] == [QuantType.Q4_K]
    assert {p.qtype for p in layer.self_attn.qkv_proj.packed.parts} == {QuantType.Q5_0}
    weight = dense.model.layers[3].self_attn.o_proj.weight.numpy()
    expected = dequantize(quantize(weight, GGMLQuantizationType.Q5_0), GGMLQuantizationType.Q5_0)
    np.testing.assert_array_equal(layer.self_attn.o_proj.packed.dequantize().numpy(), expected)
    # Q4_K's least-squares search against plain Q4_0 rounding at the same 4.5 bits per
    # weight: closer to the dense model in KL (measured 0.07 vs 0.51 nats) and top-1.
    q4_0 = load_model(default_model_dir, quantization="q4_0", threads=2)
    ids = q4k.tokenizer.encode(TEXT)
    batch = ModelBatch([SequenceChunk("r", ids, 0, list(range(8)))])
    logits = [
        ModelRunner(m, KVCacheConfig(block_size=16, num_blocks=8)).forward_logits(batch)
        for m in (q4k, q4_0, dense)
    ]
    reference = logits[2].log_softmax(-1)

    def kl(x: torch.Tensor) -> float:
        terms = reference.exp() * (reference - x.log_softmax(-1))
        return terms.sum(-1).mean().item()

    def agreement(x: torch.Tensor) -> float:
        return (x.argmax(-1) == logits[2].argmax(-1)).float().mean().item()

    assert kl(logits[0]) < kl(logits[1]) / 2
    assert agreement(logits[0]) > agreement(logits[1])


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_stats_split_the_step_into_kernels_and_host_work(quantized) -> None:
    config = EngineConfig(kv_cache_bytes=64 << 20, max_model_len=1024)
    async with Engine(quantized, config) as engine:
        await engine.generate("Hello", SamplingParams(temperature=0, max_tokens=16))
        split = engine.stats()["step_time"]
    assert 0 < split["kernel_s"] < split["total_s"]
    assert split["host_s"] == pytest.approx(split["total_s"] - split["kernel_s"])
    assert split["host_ms_per_step"] > 0


def test_a_gguf_served_dense_equals_the_dense_conversion(gguf_path: Path, dense) -> None:
    """quantization=None on a GGUF: the file's values dequantized exactly, through the same
    dense assembly as an HF directory."""
    from_gguf = load_model(gguf_path, quantization=None, load_tokenizer=False)
    ours = dict(from_gguf.model.named_parameters())
    for name, param in dense.model.named_parameters():
        assert torch.equal(ours[name], param), name
    assert from_gguf.dtype == torch.float32 and from_gguf.model.native_decoder is not None

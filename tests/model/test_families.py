"""Each supported family end to end on a tiny random model (transformers builds it from
a config of that family; no hub): greedy 32 tokens equal HF ``generate``, a request in
a batch equals the same request alone, and the quantized path (quantize at load, q8_0)
tracks the dense model within the int8 path's own bound."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import KVCacheConfig, OfflineGenerator, SamplingParams, load_model

FAMILIES = {
    "llama": dict(),
    "mistral": dict(sliding_window=24, head_dim=16),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(head_dim=24, tie_word_embeddings=True),
    "granite": dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.2,
                    logits_scaling=2.5),
    "olmo2": dict(),
    "phi3": dict(pad_token_id=0),
    "gemma3_text": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "gemma2": dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
}
# EOS banned for all 32 tokens, as HF's min_new_tokens bans it
GREEDY = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp(f"tiny-{request.param}")
    hf_model = make_hf_checkpoint(path, tiny_hf_config(request.param, **FAMILIES[request.param]))
    return request.param, path, hf_model


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (7, 19, 33)]


def test_greedy_equals_hf_generate_and_batched_equals_alone(family) -> None:
    _, path, hf_model = family
    generator = OfflineGenerator(load_model(path, load_tokenizer=False), KVCacheConfig(64))
    batched = generator.generate(prompts(), GREEDY)
    for prompt, ours in zip(prompts(), batched, strict=True):
        with torch.no_grad():
            ref = hf_model.generate(
                torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
            )[0, len(prompt):].tolist()  # fmt: skip
        assert ours == ref
        assert generator.generate([prompt], GREEDY)[0] == ours


def test_the_quantized_path_tracks_the_dense_model(family) -> None:
    """q8_0 at load (int8 weights and activations) against the dense float32 model.

    Measured over the four families: mean |q - d| 0.023-0.039 of the logits' standard
    deviation, max 0.16-0.34, argmax agreement 88-97%; the bounds are about twice that.
    Qwen3's q norms left out of the quantized model moves them to 0.16 / 1.07."""
    from streamgen.runner.batch import ModelBatch, SequenceChunk
    from streamgen.runner.model_runner import ModelRunner

    name, path, _ = family
    quantized = load_model(path, quantization="q8_0", load_tokenizer=False)
    dense = load_model(path, load_tokenizer=False)
    assert quantized.spec == dense.spec and quantized.spec.model_type == name
    prompt = prompts()[2]

    def logits(loaded) -> torch.Tensor:
        runner = ModelRunner(loaded, KVCacheConfig(num_blocks=8))
        return runner.forward_logits(ModelBatch([SequenceChunk("r", prompt, 0, [0, 1, 2])]))

    q, d = logits(quantized), logits(dense)
    assert (q - d).abs().mean().item() <= 0.08 * d.std().item()
    assert (q - d).abs().max().item() <= 0.6 * d.std().item()
    assert (q.argmax(-1) == d.argmax(-1)).float().mean().item() >= 0.75


def test_longrope_picks_the_long_factors_from_the_original_length_on() -> None:
    """Per position, as a reference of the same arithmetic: short factors before the
    original context length, long ones from it on, both scaled by the attention factor."""
    import math

    from streamgen.model.config import RopeSpec
    from streamgen.model.rope import rope_angles, rope_inv_freq, rope_long_inv_freq

    rope = RopeSpec(theta=1e4, rope_type="longrope", original_max_position_embeddings=100,
                    partial_rotary_factor=0.5, short_factor=(1.0, 2.0), long_factor=(3.0, 5.0),
                    attention_factor=1.2)  # fmt: skip
    positions = torch.tensor([0, 99, 100, 4000])
    cos, sin = rope_angles(rope, rope_inv_freq(rope, 8), rope_long_inv_freq(rope, 8), positions)
    assert cos.shape == (4, 2)  # half of 0.5 x 8 rotated dims
    for row, pos in enumerate(positions.tolist()):
        factors = rope.short_factor if pos < 100 else rope.long_factor
        for i, factor in enumerate(factors):
            angle = pos / (factor * 1e4 ** (2 * i / 4))
            # float32 angles of up to ~1e3 rad: ~1e-4 off in float64 terms
            assert cos[row, i].item() == pytest.approx(1.2 * math.cos(angle), abs=1e-3)
            assert sin[row, i].item() == pytest.approx(1.2 * math.sin(angle), abs=1e-3)


async def _engine_outputs(loaded, config, params: SamplingParams) -> tuple[list[list[int]], dict]:
    import anyio

    from streamgen import Engine

    results: dict[int, list[int]] = {}
    async with Engine(loaded, config) as engine:

        async def consume(i: int, prompt: list[int]) -> None:
            results[i] = [e.token_id async for e in engine.stream(prompt, params)]

        async with anyio.create_task_group() as tg:
            for i, prompt in enumerate(prompts()):
                tg.start_soon(consume, i, prompt)
        stats = engine.stats()
    return [results[i] for i in range(len(prompts()))], stats


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_speculation_prefix_cache_and_preemption_keep_greedy_outputs(
    family, anyio_backend: str
) -> None:
    """The engine paths beyond the forward: a draft model of the same family (the model's
    own checkpoint) and self-speculation, and preemption by recompute and swap over a
    prefix-cached pool, each give the plain greedy tokens. Windowed families (Mistral,
    the Gemmas: prompts and outputs run past their windows) draft branching trees too,
    each node's window counted from its depth (the CPU backends)."""
    from streamgen import EngineConfig, SpeculationConfig

    _, path, _ = family
    loaded = load_model(path, load_tokenizer=False)
    expected = OfflineGenerator(loaded, KVCacheConfig(64)).generate(prompts(), GREEDY)
    for speculation in (SpeculationConfig(method="self", adaptive=False),
                        SpeculationConfig(method="draft_model", draft_model=str(path),
                                          adaptive=False)):  # fmt: skip
        config = EngineConfig(num_kv_blocks=64, speculation=speculation)
        outputs, stats = await _engine_outputs(loaded, config, GREEDY)
        assert outputs == expected, speculation.method
        assert stats["speculation"]["draft_tokens"] > 0
    for mode, host in (("recompute", 0), ("swap", 64)):
        small = EngineConfig(num_kv_blocks=6, preemption_mode=mode, num_host_blocks=host,
                             max_num_batched_tokens=64, max_model_len=96)  # fmt: skip
        outputs, stats = await _engine_outputs(loaded, small, GREEDY)
        assert stats["preemptions"] > 0, mode
        assert outputs == expected, mode


@pytest.mark.parametrize("name", ["gemma3_text", "gemma2"])
@pytest.mark.parametrize("backend", ["native", "flex"])
def test_gemmas_through_the_cpu_backends(tmp_path: Path, backend: str, name: str) -> None:
    """The sliding layers' own metadata reaches the CPU attention backends the engine picks
    for larger models (the native kernels, flex), and Gemma 2's soft-capped scores go to
    the reference through them: the same logits as the reference."""
    from streamgen.attention.flex import FlexAttentionBackend, flex_available
    from streamgen.attention.native import NativeAttentionBackend
    from streamgen.native import native_kernels
    from streamgen.runner.batch import ModelBatch, SequenceChunk
    from streamgen.runner.model_runner import ModelRunner

    if backend == "native" and native_kernels() is None:
        pytest.skip("no native kernels")
    if backend == "flex" and not flex_available(torch.device("cpu")):
        pytest.skip("no flex attention")
    make_hf_checkpoint(tmp_path, tiny_hf_config(name, **FAMILIES[name]))
    loaded = load_model(tmp_path, load_tokenizer=False)
    loaded.model.native_decoder = None  # decodes through the backend, not the fused step
    make = {"native": NativeAttentionBackend, "flex": lambda: FlexAttentionBackend(
        fallback_to_reference=True)}[backend]  # fmt: skip
    outputs = {}
    for name, chosen in (("reference", "torch"), (backend, make())):
        runner = ModelRunner(loaded, KVCacheConfig(block_size=8, num_blocks=16), backend=chosen)
        tokens, table = prompts()[2], [3, 0, 7, 1, 5]
        logits = [runner.forward_logits(ModelBatch([SequenceChunk("r", tokens, 0, table)]))]
        for _ in range(4):
            tokens = [*tokens, int(logits[-1][-1].argmax())]
            chunk = SequenceChunk("r", tokens[-1:], len(tokens) - 1, table)
            logits.append(runner.forward_logits(ModelBatch([chunk])))
        outputs[name] = torch.cat([lg[-1:] for lg in logits])
    assert (outputs[backend] - outputs["reference"]).abs().max().item() < 1e-4

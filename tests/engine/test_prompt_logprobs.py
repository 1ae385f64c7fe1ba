"""Prompt logprobs (``SamplingParams(prompt_logprobs=k)``) against HF transformers'
log-softmax of the same prompt, fp32 dense path: in one prefill, chunked, after another
request cached the same prefix, and beside other requests in a batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import SamplingParams, load_model
from streamgen.engine import Engine, EngineConfig

PROMPT = [(7 * i + 3) % 200 + 3 for i in range(45)]  # 45 tokens: 3 blocks, a partial one


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    path: Path = tmp_path_factory.mktemp("tiny-prompt-logprobs")
    hf = make_hf_checkpoint(path, tiny_hf_config("llama"))
    return hf, load_model(path, load_tokenizer=False)


def hf_reference(hf: Any, prompt: list[int], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logprob of prompt[i] given prompt[:i] for i >= 1, top-k ids per position)."""
    with torch.no_grad():
        logprobs = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)
    chosen = logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    return chosen, logprobs[:-1].topk(k, -1).indices


async def prompt_logprobs(engine: Engine, prompt: list[int], k: int) -> Any:
    stream = engine.stream(prompt, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=k))
    events = [event async for event in stream]
    assert events[0].prompt_logprobs == stream.prompt_logprobs
    assert all(e.prompt_logprobs is None for e in events[1:])
    return stream.prompt_logprobs


def check(entries: Any, hf: Any, prompt: list[int], k: int) -> None:
    chosen, top = hf_reference(hf, prompt, k)
    assert len(entries) == len(prompt) - 1
    ours = torch.tensor([lp for lp, _ in entries])
    torch.testing.assert_close(ours, chosen, atol=1e-4, rtol=0)
    for (_, pairs), expected in zip(entries, top.tolist(), strict=True):
        assert [t for t, _ in pairs] == expected


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("chunk", [512, 16])  # one prefill, or chunks of 16 tokens
async def test_prompt_logprobs_equal_hf(models: Any, chunk: int) -> None:
    hf, loaded = models
    config = EngineConfig(
        kv_cache_bytes=16 << 20, max_model_len=256, max_num_batched_tokens=chunk,
        long_prefill_chunk=min(chunk, 256),
    )  # fmt: skip
    async with Engine(loaded, config) as engine:
        check(await prompt_logprobs(engine, PROMPT, 3), hf, PROMPT, 3)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cached_prefix_is_computed_again(models: Any) -> None:
    """Another request cached the prompt's full blocks; asking for prompt logprobs takes
    no hit (a cached prefix has no logits) and gets every position; a plain request after
    still reuses the cache."""
    hf, loaded = models
    config = EngineConfig(kv_cache_bytes=16 << 20, max_model_len=256)
    async with Engine(loaded, config) as engine:
        await engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2))
        assert engine.stats()["kv_blocks_cached"] >= 2
        check(await prompt_logprobs(engine, PROMPT, 2), hf, PROMPT, 2)
        plain = await engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2))
        assert len(plain.token_ids) == 2


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_batched_with_other_requests(models: Any) -> None:
    hf, loaded = models
    other = [5 + i for i in range(30)]
    config = EngineConfig(kv_cache_bytes=16 << 20, max_model_len=256)
    async with Engine(loaded, config) as engine:
        busy = engine.stream(other, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
        entries = await prompt_logprobs(engine, PROMPT, 1)
        async for _ in busy:
            pass
    check(entries, hf, PROMPT, 1)
    assert busy.prompt_logprobs is None  # not asked


def test_prompt_logprobs_range_is_checked() -> None:
    from streamgen.errors import InvalidSamplingParamsError

    for bad in (-1, 21, 1.5, True):
        with pytest.raises(InvalidSamplingParamsError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)

"""``Engine.stream_choices``: n samples of one prompt, the prompt computed once (its KV
blocks forked), each sample equal to the same request run on its own with the sample's
derived seed, each stream cancelled on its own."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import anyio
import pytest
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import SamplingParams, load_model
from streamgen.engine import Engine, EngineConfig
from streamgen.errors import InvalidPromptError, RequestError
from streamgen.sampling_params import choice_seed

SAMPLED = SamplingParams(temperature=1.0, top_k=50, max_tokens=10, ignore_eos=True, seed=11)
CONFIG = EngineConfig(num_kv_blocks=64, block_size=4, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("tiny-choices")
    make_hf_checkpoint(path, tiny_hf_config("llama"))
    return load_model(path, load_tokenizer=False)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def tokens(stream) -> list[int]:
    return [event.token_id async for event in stream]


@pytest.mark.anyio
@pytest.mark.parametrize("length", [13, 9, 40])  # a partial last block, a full one, chunked
async def test_each_sample_equals_its_seed_run_alone_and_the_prompt_is_forked(
    loaded, length: int
) -> None:
    prompt = [(5 * j + 3) % 200 for j in range(length)]
    async with Engine(loaded, CONFIG) as engine:
        alone = []
        for i in range(3):
            params = replace(SAMPLED, seed=choice_seed(SAMPLED.seed, i))
            alone.append(await tokens(engine.stream(prompt, params)))
        assert engine.stats()["forks"] == 0
        async with anyio.create_task_group() as tg:
            results: dict[int, list[int]] = {}

            async def read(i: int, stream) -> None:
                results[i] = await tokens(stream)

            for i, stream in enumerate(engine.stream_choices(prompt, SAMPLED, n=3)):
                tg.start_soon(read, i, stream)
        assert [results[i] for i in range(3)] == alone
        assert len({tuple(r) for r in alone}) == 3  # the derived seeds differ
        assert engine.stats()["forks"] == 2


@pytest.mark.anyio
async def test_cancelling_one_sample_leaves_the_others(loaded) -> None:
    prompt = list(range(3, 30))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    async with Engine(loaded, CONFIG) as engine:
        expected = await tokens(engine.stream(prompt, params))
        first, second, third = engine.stream_choices(prompt, params, n=3)
        second.cancel()
        assert await tokens(first) == expected and await tokens(third) == expected
        assert second.finish_reason == "abort"
        for _ in range(500):  # bounded polls: the cancelled one's blocks come back too
            if engine.stats()["kv_blocks_used"] == 0:
                break
            await anyio.sleep(0.01)
        assert engine.stats()["kv_blocks_used"] == 0


@pytest.mark.anyio
async def test_bad_n_and_bad_prompts_are_refused_before_queueing(loaded) -> None:
    async with Engine(loaded, CONFIG) as engine:
        for n in (0, -1, True, 2.0):
            with pytest.raises(RequestError, match="n must be"):
                engine.stream_choices([1, 2, 3], n=n)
        with pytest.raises(InvalidPromptError):
            engine.stream_choices([], n=2)
        assert engine.stats()["waiting"] == engine.stats()["running"] == 0

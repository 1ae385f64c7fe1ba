"""The async engine on a tiny random model, under asyncio and trio (anyio)."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import OfflineGenerator, SamplingParams, load_model
from streamgen.engine import Engine, EngineConfig
from streamgen.errors import InvalidPromptError, RequestError
from streamgen.runner.kv_cache import KVCacheConfig

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("tiny-engine")
    make_hf_checkpoint(path, tiny_hf_config("llama"))
    return load_model(path, load_tokenizer=False)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def prompts() -> list[list[int]]:
    return [list(range(3, 3 + n)) for n in (5, 17, 33, 9)]


def reference(loaded, params: SamplingParams = GREEDY) -> list[list[int]]:
    """Greedy outputs from the offline generator (checked against HF elsewhere)."""
    return OfflineGenerator(loaded, KVCacheConfig(num_blocks=64)).generate(prompts(), params)


async def wait_for_free_blocks(engine: Engine, max_polls: int = 500) -> dict:
    """Poll (bounded count, not wall time) until no KV block is held by a request."""
    for _ in range(max_polls):
        stats = engine.stats()
        if stats["kv_blocks_used"] == 0:
            return stats
        await anyio.sleep(0.01)
    return engine.stats()


@pytest.mark.anyio
async def test_concurrent_streams_match_offline_greedy(loaded) -> None:
    expected = reference(loaded)
    results: dict[int, list[int]] = {}
    async with Engine(loaded, EngineConfig(num_kv_blocks=64, max_num_batched_tokens=32)) as engine:

        async def consume(i: int, prompt: list[int]) -> None:
            stream = engine.stream(prompt, GREEDY)
            results[i] = [event.token_id async for event in stream]
            assert stream.finish_reason == "length"
            assert stream.metrics.ttft is not None

        async with anyio.create_task_group() as tg:
            for i, prompt in enumerate(prompts()):
                tg.start_soon(consume, i, prompt)
        stats = await wait_for_free_blocks(engine)
    assert [results[i] for i in range(len(expected))] == expected
    assert stats["kv_blocks_used"] == 0


@pytest.mark.anyio
async def test_break_cancel_and_aclose_free_blocks(loaded) -> None:
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    async with Engine(loaded, EngineConfig(num_kv_blocks=64)) as engine:
        async for event in engine.stream(prompts()[1], params):
            if event.index == 3:
                break
        handle = engine.stream(prompts()[2], params)
        await handle.__anext__()
        handle.cancel()
        assert [e async for e in handle] == []
        assert handle.finish_reason == "abort"
        closing = engine.stream(prompts()[0], params)
        await closing.__anext__()
        await closing.aclose()
        stats = await wait_for_free_blocks(engine)
        assert stats["kv_blocks_used"] == 0
        assert stats["running"] == stats["waiting"] == 0


@pytest.mark.anyio
async def test_cancelled_consumer_task_frees_blocks(loaded) -> None:
    params = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
    async with Engine(loaded, EngineConfig(num_kv_blocks=64, stream_buffer=2)) as engine:
        with anyio.move_on_after(0.3):
            async for _ in engine.stream(prompts()[0], params):
                await anyio.sleep(0.01)
        stats = await wait_for_free_blocks(engine)
    assert stats["kv_blocks_used"] == 0


@pytest.mark.anyio
async def test_backpressure_pauses_a_silent_consumer_only(loaded) -> None:
    expected = reference(loaded)
    buffer = 2
    async with Engine(loaded, EngineConfig(num_kv_blocks=64, stream_buffer=buffer)) as engine:
        silent = engine.stream(prompts()[0], GREEDY)
        others = [engine.stream(p, GREEDY) for p in prompts()[1:]]
        outputs = []
        for stream in others:
            outputs.append([e.token_id async for e in stream])
        assert outputs == expected[1:]
        # The silent request produced at most `buffer` tokens while the others finished.
        core = engine._core
        assert core is not None
        request = core.scheduler.get_request(silent.request_id)
        assert request is not None and len(request.output_token_ids) <= buffer
        # Reading resumes it to the output it would have had.
        assert [e.token_id async for e in silent] == expected[0]


@pytest.mark.anyio
async def test_bad_input_is_rejected_before_queueing(loaded) -> None:
    async with Engine(loaded, EngineConfig(num_kv_blocks=8, max_model_len=128)) as engine:
        with pytest.raises(InvalidPromptError, match="empty"):
            engine.stream([], GREEDY)
        with pytest.raises(InvalidPromptError, match="vocabulary"):
            engine.stream([3, 10_000], GREEDY)
        with pytest.raises(RequestError, match="SamplingParams"):
            engine.stream([3, 4], {"temperature": 0})  # type: ignore[arg-type]
        # The pool (8 blocks) bounds max_model_len at start, so a prompt too big for the
        # pool is too long for the engine: typed at the call either way.
        with pytest.raises(InvalidPromptError, match="max_model_len=128"):
            engine.stream(list(range(3, 3 + 8 * 16 + 1)), GREEDY)
        assert engine.stats()["waiting"] == 0
        completion = await engine.generate([3, 4, 5], GREEDY)
        assert len(completion.token_ids) == 12


@pytest.mark.anyio
async def test_preemption_in_both_modes_keeps_outputs(loaded) -> None:
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = reference(loaded, params)
    for mode, host in (("recompute", 0), ("swap", 64)):
        config = EngineConfig(num_kv_blocks=6, preemption_mode=mode, num_host_blocks=host,
                              max_num_batched_tokens=64, max_model_len=96)
        async with Engine(loaded, config) as engine:
            results: dict[int, list[int]] = {}

            async def consume(
                i: int, prompt: list[int], engine: Engine = engine, results: dict = results
            ) -> None:
                results[i] = [e.token_id async for e in engine.stream(prompt, params)]

            async with anyio.create_task_group() as tg:
                for i, prompt in enumerate(prompts()):
                    tg.start_soon(consume, i, prompt)
            assert engine.stats()["preemptions"] > 0, mode
        assert [results[i] for i in range(4)] == expected, mode

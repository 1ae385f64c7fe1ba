"""Failures, cancel storms and priorities in the async engine (tiny random model)."""

from __future__ import annotations

import random
from pathlib import Path

import anyio
import pytest
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import SamplingParams, load_model
from streamgen.engine import Engine, EngineConfig
from streamgen.errors import ConfigError, EngineDeadError, StreamgenError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("tiny-robust")
    make_hf_checkpoint(path, tiny_hf_config("llama"))
    return load_model(path, load_tokenizer=False)


async def test_core_death_fails_every_open_stream(loaded) -> None:
    params = SamplingParams(temperature=0, max_tokens=100, ignore_eos=True)
    async with Engine(loaded, EngineConfig(num_kv_blocks=64, stream_buffer=1)) as engine:
        streams = [engine.stream([3, 4, 5, 6], params) for _ in range(3)]
        await streams[0].__anext__()
        core = engine._core
        assert core is not None

        def broken_schedule():
            raise RuntimeError("scheduler bug")

        core.scheduler.schedule = broken_schedule  # type: ignore[method-assign]
        for stream in streams:
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
        assert not engine.healthy
        with pytest.raises(EngineDeadError):
            engine.stream([3, 4], params)


async def test_a_failing_step_fails_its_requests_only(loaded) -> None:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    async with Engine(loaded, EngineConfig(num_kv_blocks=64)) as engine:
        core = engine._core
        assert core is not None
        real_execute = core.runner.execute
        calls = {"n": 0}

        def flaky_execute(batch, masked=None):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("transient kernel failure")
            return real_execute(batch, masked)

        core.runner.execute = flaky_execute  # type: ignore[method-assign]
        victim = engine.stream([3, 4, 5], params)
        with pytest.raises(StreamgenError, match="transient kernel failure"):
            async for _ in victim:
                pass
        survivor = await engine.generate([3, 4, 5], params)
        assert len(survivor.token_ids) == 8
        assert engine.healthy
        assert engine.stats()["kv_blocks_used"] == 0


async def test_cancel_storm_leaks_no_blocks(loaded) -> None:
    rng = random.Random(0)
    config = EngineConfig(num_kv_blocks=48, max_num_seqs=16, stream_buffer=2)
    async with Engine(loaded, config) as engine:

        async def client(i: int) -> None:
            params = SamplingParams(temperature=1.0, max_tokens=rng.randint(1, 30),
                                    ignore_eos=True, seed=i)
            prompt = [rng.randint(3, 200) for _ in range(rng.randint(1, 40))]
            stop_after = rng.choice([None, 0, 1, 3, 10])
            stream = engine.stream(prompt, params, priority=rng.randint(0, 3))
            if stop_after == 0:
                stream.cancel()
            async for event in stream:
                if stop_after is not None and event.index + 1 >= stop_after:
                    if rng.random() < 0.5:
                        stream.cancel()
                    else:
                        break
                await anyio.sleep(0)

        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(client, i)
        for _ in range(500):
            stats = engine.stats()
            if stats["kv_blocks_used"] == 0 and stats["running"] == stats["waiting"] == 0:
                break
            await anyio.sleep(0.01)
    total = stats["kv_blocks_total"]
    assert stats["kv_blocks_free"] + stats["kv_blocks_cached"] == total
    assert stats["running"] == stats["waiting"] == stats["swapped"] == 0


async def test_high_priority_request_is_served_within_a_few_steps(loaded) -> None:
    """Counted in core steps from the step the urgent request reaches the scheduler to
    the step that first schedules it (both seen on the core thread): the event loop's
    wake-ups on either side are not the scheduler's latency."""
    low = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    config = EngineConfig(
        num_kv_blocks=12, max_model_len=192, max_num_seqs=4, max_num_batched_tokens=64
    )
    async with Engine(loaded, config) as engine:
        background = [engine.stream(list(range(3, 30)), low) for _ in range(6)]
        for stream in background[:4]:
            await stream.__anext__()  # the pool and the slots are full of priority-0 work
        core = engine._core
        assert core is not None
        scheduler = core.scheduler
        add_request, schedule = scheduler.add_request, scheduler.schedule
        seen: dict[str, int] = {}
        urgent_ids: list[str] = []

        def counted_add(request):
            if request.priority == 10:
                urgent_ids.append(request.request_id)
                seen["added"] = core.num_steps
            return add_request(request)

        def counted_schedule():
            output = schedule()
            scheduled = urgent_ids and urgent_ids[0] in output.num_scheduled_tokens
            if scheduled and "scheduled" not in seen:
                seen["scheduled"] = core.num_steps + 1  # the step this output runs
            return output

        scheduler.add_request = counted_add
        scheduler.schedule = counted_schedule
        urgent = engine.stream([5, 6, 7], SamplingParams(temperature=0, max_tokens=2), 10)
        first = await urgent.__anext__()
        assert first.index == 0
        assert seen["scheduled"] - seen["added"] <= 1  # the next step preempts for it
        for stream in background:
            stream.cancel()


def test_presets_and_config_validation() -> None:
    assert EngineConfig.preset("high_throughput", max_num_seqs=7).max_num_seqs == 7
    assert EngineConfig.preset("low_latency").stream_buffer == 4
    with pytest.raises(ConfigError, match="preset"):
        EngineConfig.preset("fastest")
    with pytest.raises(ConfigError, match="num_host_blocks"):
        EngineConfig(preemption_mode="swap")
    with pytest.raises(ConfigError, match="max_num_seqs"):
        EngineConfig(max_num_seqs=0)

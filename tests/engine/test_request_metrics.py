"""Request metrics (queue time, TTFT, inter-token latencies) and engine throughput."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import Engine, EngineConfig, SamplingParams, load_model
from streamgen.engine.metrics import ThroughputMeter


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("tiny-metrics")
    make_hf_checkpoint(path, tiny_hf_config("llama"))
    return load_model(path, load_tokenizer=False)


@pytest.mark.anyio
async def test_metrics_are_ordered_and_stats_count_tokens(loaded) -> None:
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    # One sequence slot: the second request waits for the first to finish.
    async with Engine(loaded, EngineConfig(num_kv_blocks=16, max_num_seqs=1)) as engine:
        first = engine.stream([3, 4, 5], params)
        second = engine.stream([6, 7, 8], params)
        async with anyio.create_task_group() as tg:
            for stream in (first, second):
                async def drain(s=stream) -> None:
                    async for _ in s:
                        pass
                tg.start_soon(drain)
        stats = engine.stats()
    for stream in (first, second):
        m = stream.metrics
        assert m.scheduled_at is not None and m.first_token_at is not None
        assert m.submitted_at <= m.scheduled_at <= m.first_token_at
        assert 0 <= m.queue_time <= m.ttft
        assert len(m.inter_token_latencies) == 7
    # The second request queued while the first ran (one sequence slot).
    assert second.metrics.scheduled_at > first.metrics.scheduled_at
    assert stats["generated_tokens"] == 16
    assert stats["throughput_tok_s"] >= 0.0


def test_throughput_meter_forgets_old_steps() -> None:
    meter = ThroughputMeter(window=2.0)
    for t in range(10):
        meter.add(float(t), 4)
    assert meter.total_tokens == 40
    # Steps at 7, 8, 9 are in the window: 8 tokens after the first over 2 s.
    assert meter.tokens_per_second(now=9.0) == 4.0
    assert meter.tokens_per_second(now=100.0) == 0.0

"""streamgen through its public async API: one `Engine`, one `engine.stream()` per request.

Each session starts a fresh Engine (fresh KV cache and prefix cache) on a
private event loop; requests are submitted at their arrival times and read by
their own consumer task (a slow consumer sleeps after every token).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Sequence
from typing import Any

from bench.systems.base import Progress, Trace, Unavailable
from bench.workloads import Request, SystemOptions


class StreamgenSystem:
    """streamgen's Engine on the model loaded once per worker."""

    runs_streamgen_only_arms = True

    def __init__(self, model: str | None, dtype: str, threads: int) -> None:
        from streamgen import load_model

        self.loaded = load_model(model, dtype=dtype, load_tokenizer=False)
        self.dtype = dtype
        self.threads = threads

    def session(self, options: SystemOptions) -> StreamgenSession:
        return StreamgenSession(
            self.loaded, engine_config(options, self.dtype, self.threads), options
        )


def engine_config(options: SystemOptions, dtype: str, threads: int) -> Any:
    """The EngineConfig of an arm; speculation only where EngineConfig has the field."""
    from streamgen import EngineConfig

    extra: dict[str, Any] = {}
    if options.speculation is not None:
        extra["speculation"] = speculation_config(options.speculation)
    if options.prefix_caching is not None:
        extra["enable_prefix_caching"] = options.prefix_caching
    return EngineConfig(
        dtype=dtype,
        threads=threads,
        max_num_seqs=options.max_num_seqs,
        max_num_batched_tokens=options.max_num_batched_tokens,
        stream_buffer=options.stream_buffer,
        kv_cache_bytes=options.kv_cache_bytes,
        # Every workload fits in 2048 tokens; the engine refuses a pool that cannot hold
        # one request of max_model_len (the model's 8192 would not fit the quick pools).
        max_model_len=2048,
        **extra,
    )


def speculation_config(setting: str) -> Any:
    """``EngineConfig.speculation`` from a method name (``"ngram"``) or a JSON object of
    ``SpeculationConfig`` fields (``'{"method": "ngram", "max_nodes": 12}'``)."""
    from streamgen import EngineConfig

    if "speculation" not in {f.name for f in dataclasses.fields(EngineConfig)}:
        raise Unavailable("not available: EngineConfig has no `speculation` field yet")
    fields = json.loads(setting) if setting.lstrip().startswith("{") else {"method": setting}
    try:
        from streamgen.spec.config import SpeculationConfig
    except ImportError:
        return setting
    return SpeculationConfig(**fields)


class StreamgenSession:
    """A started Engine and the event loop it lives on."""

    def __init__(self, loaded: Any, config: Any, options: SystemOptions) -> None:
        from streamgen import Engine

        self.options = options
        self.loop = asyncio.new_event_loop()
        self.engine = Engine(loaded, config)
        self.loop.run_until_complete(self.engine.start())

    def run(self, requests: Sequence[Request], progress: Progress) -> list[Trace]:
        return self.loop.run_until_complete(self._run(requests, progress))

    async def _run(self, requests: Sequence[Request], progress: Progress) -> list[Trace]:
        from streamgen import SamplingParams

        start = time.perf_counter()
        stop_slow = asyncio.Event()
        traces: list[Trace | None] = [None] * len(requests)

        async def consume(i: int, request: Request) -> None:
            await asyncio.sleep(max(0.0, request.arrival_s - (time.perf_counter() - start)))
            params = SamplingParams(temperature=0, max_tokens=request.output_len, ignore_eos=True)
            trace = traces[i] = Trace(time.perf_counter() - start, request.tag)
            stream = self.engine.stream(list(request.prompt), params)
            async for event in stream:
                trace.add(time.perf_counter() - start, event.token_id)
                progress(1)
                if request.read_delay_s:
                    await asyncio.sleep(request.read_delay_s)
                    if stop_slow.is_set():
                        stream.cancel()
                        break

        fast = [
            asyncio.ensure_future(consume(i, r))
            for i, r in enumerate(requests)
            if not r.read_delay_s
        ]
        slow = [
            asyncio.ensure_future(consume(i, r)) for i, r in enumerate(requests) if r.read_delay_s
        ]
        await asyncio.gather(*fast)
        if self.options.stop_slow_when_fast_done:
            stop_slow.set()
        await asyncio.gather(*slow)
        return [t for t in traces if t is not None]

    def info(self) -> dict[str, Any]:
        stats = self.engine.stats()
        info = {"preemptions": stats["preemptions"], "steps": stats["steps"]}
        spec = stats.get("speculation")
        if spec:  # acceptance rate, mean accepted length, draft / verify seconds
            info["speculation"] = spec
        return info

    def close(self) -> None:
        self.loop.run_until_complete(self.engine.aclose())
        self.loop.close()

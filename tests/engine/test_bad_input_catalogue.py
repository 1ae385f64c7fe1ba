"""A catalogue of bad input through the public API: every item gets a typed streamgen
error at the call, naming the argument; nothing is queued; the same engine then serves a
good request exactly as before. Plus garbage straight into the core's inbox, and the
documented no-ops of a finished stream."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from streamgen import SamplingParams, load_model
from streamgen.engine import Engine, EngineConfig
from streamgen.engine.events import Abort, Credit, SetPriority
from streamgen.errors import (
    ConfigError,
    EngineNotStartedError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    ModelLoadError,
    RequestError,
    StreamgenError,
)

pytestmark = [pytest.mark.anyio, pytest.mark.real_model]

GOOD = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def loaded(default_model_dir: Path):
    return load_model(default_model_dir, quantization=None)


# (id, what to call, the error type, words its message must hold)
CONSTRUCTION: list[tuple[str, Callable[[], Any], type[StreamgenError], str]] = [
    ("engine-int-model", lambda: Engine(12345), ConfigError, "model"),
    ("engine-bytes-model", lambda: Engine(b"/tmp/x"), ConfigError, "model"),
    ("engine-dict-config", lambda: Engine(None, {"max_num_seqs": 4}), ConfigError, "config"),
    ("backend-name", lambda: EngineConfig(attention_backend="warp-drive"), ConfigError,
     "attention_backend"),
    ("dtype-name", lambda: EngineConfig(dtype="float8"), ConfigError, "dtype"),
    ("kv-bytes-zero", lambda: EngineConfig(kv_cache_bytes=0), ConfigError, "kv_cache_bytes"),
    ("max-seqs-bool", lambda: EngineConfig(max_num_seqs=True), ConfigError, "max_num_seqs"),
    ("prefix-cache-str", lambda: EngineConfig(enable_prefix_caching="yes"), ConfigError,
     "enable_prefix_caching"),
    ("quantization-name", lambda: EngineConfig(quantization="q3_z"), ConfigError,
     "quantization"),
    ("activation-bits", lambda: EngineConfig(activation_bits=12), ConfigError,
     "activation_bits"),
    ("config-seed-huge", lambda: EngineConfig(seed=2**80), ConfigError, "seed"),
    ("config-seed-str", lambda: EngineConfig(seed="7"), ConfigError, "seed"),
    ("aging-zero", lambda: EngineConfig(priority_aging_s=0), ConfigError, "priority_aging_s"),
    ("threads-zero", lambda: EngineConfig(threads=0), ConfigError, "threads"),
    ("chunk-bool", lambda: EngineConfig(long_prefill_chunk=True), ConfigError,
     "long_prefill_chunk"),
    ("host-blocks-negative", lambda: EngineConfig(num_host_blocks=-1), ConfigError,
     "num_host_blocks"),
    ("preemption-mode", lambda: EngineConfig(preemption_mode="drop"), ConfigError,
     "preemption_mode"),
    ("temperature", lambda: SamplingParams(temperature=-1), InvalidSamplingParamsError,
     "temperature"),
    ("top-p", lambda: SamplingParams(top_p=0), InvalidSamplingParamsError, "top_p"),
    ("max-tokens", lambda: SamplingParams(max_tokens=0), InvalidSamplingParamsError,
     "max_tokens"),
    ("seed-str", lambda: SamplingParams(seed="7"), InvalidSamplingParamsError, "seed"),
    ("seed-float", lambda: SamplingParams(seed=1.5), InvalidSamplingParamsError, "seed"),
    ("stop-ids-negative", lambda: SamplingParams(stop_token_ids=[-1]),
     InvalidSamplingParamsError, "stop_token_ids"),
    ("stop-empty", lambda: SamplingParams(stop=[""]), InvalidSamplingParamsError, "stop"),
    ("logprobs", lambda: SamplingParams(logprobs=100), InvalidSamplingParamsError, "logprobs"),
    ("logit-bias-range", lambda: SamplingParams(logit_bias={1: 1e3}), InvalidSamplingParamsError,
     "logit_bias"),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "error", "words"), [c[1:] for c in CONSTRUCTION],
                         ids=[c[0] for c in CONSTRUCTION])  # fmt: skip
def test_construction_is_checked(fn: Callable[[], Any], error: type, words: str) -> None:
    with pytest.raises(error, match=words):
        fn()


async def test_an_engine_not_started_says_so() -> None:
    engine = Engine()
    with pytest.raises(EngineNotStartedError, match="start"):
        engine.stream("hi")
    with pytest.raises(EngineNotStartedError, match="start"):
        engine.stats()
    with pytest.raises(EngineNotStartedError, match="start"):
        await engine.generate("hi")
    with pytest.raises(RuntimeError):  # still a RuntimeError for old callers
        engine.stream("hi")


# (id, the call on a started engine, the error type, words its message must hold)
ON_ENGINE: list[tuple[str, Callable[[Engine], Any], type[StreamgenError], str]] = [
    ("prompt-none", lambda e: e.stream(None), InvalidPromptError, "prompt"),
    ("prompt-int", lambda e: e.stream(42), InvalidPromptError, "prompt"),
    ("prompt-bytes", lambda e: e.stream(b"hello"), InvalidPromptError, "bytes"),
    ("prompt-empty-list", lambda e: e.stream([]), InvalidPromptError, "empty"),
    ("prompt-empty-text", lambda e: e.stream(""), InvalidPromptError, "empty"),
    ("prompt-mixed-str", lambda e: e.stream([1, "a"]), InvalidPromptError, "item 1"),
    ("prompt-mixed-bool", lambda e: e.stream([1, True]), InvalidPromptError, "item 1"),
    ("prompt-float-ids", lambda e: e.stream([1.0, 2.0]), InvalidPromptError, "item 0"),
    ("token-out-of-vocab", lambda e: e.stream([10**9]), InvalidPromptError, "vocabulary"),
    ("token-negative", lambda e: e.stream([-3]), InvalidPromptError, "vocabulary"),
    ("chat-empty-message", lambda e: e.stream([{}]), InvalidPromptError, "chat message 0"),
    ("chat-no-content", lambda e: e.stream([{"role": "user"}]), InvalidPromptError,
     "content"),
    ("chat-none-content", lambda e: e.stream([{"role": "user", "content": None}]),
     InvalidPromptError, "content must be a str"),
    ("chat-int-role", lambda e: e.stream([{"role": 1, "content": "x"}]), InvalidPromptError,
     "role must be a str"),
    ("chat-second-bad", lambda e: e.stream([GOOD[0], {"role": "assistant"}]),
     InvalidPromptError, "chat message 1"),
    ("chat-and-ids", lambda e: e.stream([GOOD[0], 5]), InvalidPromptError, "mix"),
    ("params-str", lambda e: e.stream(GOOD, "greedy"), RequestError, "params"),
    ("priority-str", lambda e: e.stream(GOOD, GREEDY, "high"), RequestError, "priority"),
    ("priority-float", lambda e: e.stream(GOOD, GREEDY, 1.5), RequestError, "priority"),
    ("priority-bool", lambda e: e.stream(GOOD, GREEDY, True), RequestError, "priority"),
    ("priority-huge", lambda e: e.stream(GOOD, GREEDY, 2**40), RequestError, "priority"),
    ("buffer-bool", lambda e: e.stream(GOOD, GREEDY, buffer=True), RequestError, "buffer"),
    ("buffer-zero", lambda e: e.stream(GOOD, GREEDY, buffer=0), RequestError, "buffer"),
    ("stop-id-out-of-vocab", lambda e: e.stream(GOOD, SamplingParams(stop_token_ids=[10**6])),
     InvalidSamplingParamsError, "stop_token_ids"),
    ("prompt-too-long", lambda e: e.stream([5] * 1100), InvalidPromptError, "max_model_len"),
    ("bias-id-out-of-vocab", lambda e: e.stream(GOOD, SamplingParams(logit_bias={10**6: 1.0})),
     InvalidSamplingParamsError, "logit_bias"),
    ("chat-template-kwargs", lambda e: e.tokenize([{"role": "user", "content": "x"}],
                                                 add_generation_prompt=False),
     RequestError, "template"),
]  # fmt: skip


async def test_bad_calls_on_a_running_engine_leave_it_untouched(loaded) -> None:
    config = EngineConfig(kv_cache_bytes=64 << 20, max_model_len=1024)
    async with Engine(loaded, config) as engine:
        reference = await engine.generate(GOOD, GREEDY)
        assert "Paris" in reference.text
        for name, call, error, words in ON_ENGINE:
            before = _counts(engine)
            with pytest.raises(error, match=words):
                call(engine)
            assert _counts(engine) == before, name
        after = await engine.generate(GOOD, GREEDY)
        assert after.token_ids == reference.token_ids
        assert engine.healthy


async def test_bad_priority_on_a_live_stream_is_refused_at_the_call(loaded) -> None:
    async with Engine(loaded, EngineConfig(kv_cache_bytes=64 << 20, max_model_len=1024)) as engine:
        reference = await engine.generate(GOOD, GREEDY)
        stream = engine.stream(GOOD, GREEDY)
        for bad in ("high", None, 1.5, True, 2**40):
            with pytest.raises(RequestError, match="priority"):
                stream.set_priority(bad)  # type: ignore[arg-type]
        tokens = [event.token_id async for event in stream]
        assert tokens == reference.token_ids and engine.healthy


async def test_garbage_in_the_inbox_is_dropped_and_the_engine_keeps_serving(loaded) -> None:
    async with Engine(loaded, EngineConfig(kv_cache_bytes=64 << 20, max_model_len=1024)) as engine:
        reference = await engine.generate(GOOD, GREEDY)
        core = engine._core
        assert core is not None
        victim = engine.stream(GOOD, SamplingParams(temperature=0, max_tokens=200))
        await victim.__anext__()
        for garbage in (object(), ("not", "a request"), (1, 2, 3), Abort(123),
                        Credit(victim.request_id, -5), Credit("nobody", 3),
                        SetPriority("nobody", 1), 42, None):  # fmt: skip
            core._inbox.put(garbage)
        core._inbox.put(SetPriority(victim.request_id, "high"))  # names a live request
        with pytest.raises(RequestError, match="malformed command"):
            async for _ in victim:
                pass
        after = await engine.generate(GOOD, GREEDY)
        assert after.token_ids == reference.token_ids
        assert engine.healthy
        stats = engine.stats()
        assert stats["running"] == stats["waiting"] == 0 and stats["kv_blocks_used"] == 0


async def test_finished_stream_controls_are_documented_no_ops(loaded) -> None:
    async with Engine(loaded, EngineConfig(kv_cache_bytes=64 << 20, max_model_len=1024)) as engine:
        stream = engine.stream(GOOD, GREEDY)
        tokens = [event.token_id async for event in stream]
        reason = stream.finish_reason
        assert tokens and reason in ("stop", "length")
        stream.cancel()
        stream.set_priority(5)
        await stream.aclose()
        assert stream.finish_reason == reason and stream.status == "finished"
        assert [event async for event in stream] == []  # a second iteration: nothing
        again = await engine.generate(GOOD, GREEDY)
        assert again.token_ids == tokens


async def test_a_pool_too_small_for_one_request_fails_at_start(loaded) -> None:
    engine = Engine(loaded, EngineConfig(kv_cache_bytes=1, max_model_len=2048))
    with pytest.raises(ConfigError, match=r"holds \d+ blocks.*max_model_len=2048.*128 blocks"):
        await engine.start()


async def test_a_bad_gguf_file_fails_at_start_naming_the_tensor(tmp_path: Path) -> None:
    import numpy as np

    from tests.checkpoint.gguf_files import tiny_llama_tensors, write_tiny_llama

    path = write_tiny_llama(tmp_path / "m.gguf", tiny_llama_tensors(np.random.default_rng(0)))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 64])
    with pytest.raises(ModelLoadError, match=r"tensor \S+ .*truncated"):
        await Engine(str(path)).start()
    with pytest.raises(ModelLoadError):
        await Engine(str(tmp_path / "absent.gguf")).start()


def _counts(engine: Engine) -> tuple[int, int, int, int]:
    stats = engine.stats()
    return stats["running"], stats["waiting"], stats["kv_blocks_used"], stats["swapped"]

"""The engine with the real default model: text deltas, chat prompts, stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamgen import SamplingParams, load_model
from streamgen.engine import Engine, EngineConfig

pytestmark = [pytest.mark.real_model, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def loaded(default_model_dir: Path):
    return load_model(default_model_dir)


async def test_chat_stream_text_equals_full_decode(loaded) -> None:
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    params = SamplingParams(temperature=0, max_tokens=24)
    async with Engine(loaded, EngineConfig(kv_cache_bytes=64 << 20, max_model_len=1024)) as engine:
        events = [e async for e in engine.stream(chat, params)]
    text = "".join(e.text for e in events)
    ids = [e.token_id for e in events]
    assert "Paris" in text
    assert text == loaded.tokenizer.decode(ids, skip_special_tokens=True)
    assert [e.index for e in events] == list(range(len(events)))
    assert events[-1].finish_reason in ("stop", "length")


async def test_stop_string_is_never_emitted(loaded) -> None:
    chat = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    free = SamplingParams(temperature=0, max_tokens=60)
    async with Engine(loaded, EngineConfig(kv_cache_bytes=64 << 20, max_model_len=1024)) as engine:
        full = await engine.generate(chat, free)
        assert "7" in full.text
        stopped = await engine.generate(chat, SamplingParams(temperature=0, max_tokens=60,
                                                             stop=["7"]))
    assert stopped.finish_reason == "stop"
    assert "7" not in stopped.text
    assert full.text.startswith(stopped.text)
    assert stopped.text == full.text[: full.text.index("7")]

"""``chat_template_kwargs`` reach the chat template from every SDK entry point (Qwen3's
``enable_thinking`` switch is one), checked with a template that reads one."""

from __future__ import annotations

from pathlib import Path

import pytest

from streamgen import Engine, EngineConfig, RequestError, SamplingParams

pytestmark = [pytest.mark.anyio, pytest.mark.real_model]
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}"
)
CHAT = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_kwargs_reach_the_template(default_model_dir: Path) -> None:
    async with Engine(None, EngineConfig(max_model_len=256, kv_cache_bytes=16 << 20)) as engine:
        engine.tokenizer.chat_template = TEMPLATE
        plain = engine.tokenize(CHAT)
        quiet = engine.tokenize(CHAT, enable_thinking=False)
        think = engine.tokenizer.encode("<think>\n\n</think>\n\n")
        assert quiet == plain + think
        params = SamplingParams(temperature=0, max_tokens=4)
        from_ids = await engine.generate(quiet, params)
        from_kwargs = await engine.generate(
            CHAT, params, chat_template_kwargs={"enable_thinking": False}
        )
        assert from_kwargs.token_ids == from_ids.token_ids
        a, b = engine.stream_choices(CHAT, params, n=2,
                                     chat_template_kwargs={"enable_thinking": False})  # fmt: skip
        assert [e.token_id async for e in a] == from_ids.token_ids
        b.cancel()
        with pytest.raises(RequestError, match="chat_template_kwargs"):
            engine.stream(CHAT, params, chat_template_kwargs=[("enable_thinking", False)])

"""The model families' own chat templates (as their repositories ship them; read from
the copies llama.cpp keeps in ``models/templates/``, unpacked from the llama-cpp-python
0.3.36 sdist by ``bench.llama_cpp_tools.converter_dir``, once per machine) render
through the engine as each model card documents its prompt format:
system prompts, Gemma 2's refusal of them (a typed error at the call, nothing queued),
Qwen3's ``enable_thinking`` switch, and the same text as transformers'
``apply_chat_template`` on the same tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streamgen import Engine, EngineConfig, InvalidPromptError, SamplingParams

pytestmark = [pytest.mark.anyio, pytest.mark.real_model]
SYSTEM_CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"}]  # fmt: skip
# (template, messages, chat_template_kwargs, the prompt the model card documents)
CASES = {
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", SYSTEM_CHAT, {},
              "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
              "<|im_start|>assistant\n"),
    "qwen3-no-thinking": ("Qwen-Qwen3-0.6B.jinja", SYSTEM_CHAT, {"enable_thinking": False},
                          "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi"
                          "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    "gemma2": ("google-gemma-2-2b-it.jinja", CHAT, {},
               "{bos}<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello."
               "<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
    "phi3.5": ("microsoft-Phi-3.5-mini-instruct.jinja", SYSTEM_CHAT, {},
               "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"),
    "granite3.3": ("ibm-granite-granite-3.3-2B-Instruct.jinja", SYSTEM_CHAT, {},
                   "<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>\n"
                   "<|start_of_role|>user<|end_of_role|>Hi<|end_of_text|>\n"
                   "<|start_of_role|>assistant<|end_of_role|>"),
}  # fmt: skip


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def templates() -> Path:
    from bench.llama_cpp_tools import converter_dir

    return converter_dir() / "models" / "templates"


def engine(model_dir: Path) -> Any:  # the default model (model_dir: its fixture built it)
    return Engine(None, EngineConfig(max_model_len=256, kv_cache_bytes=16 << 20))


async def test_family_templates_render_their_documented_prompts(
    default_model_dir: Path, templates: Path
) -> None:
    async with engine(default_model_dir) as running:
        tokenizer = running.tokenizer
        for case, (name, messages, kwargs, documented) in CASES.items():
            tokenizer.chat_template = (templates / name).read_text()
            ids = running.tokenize(messages, **kwargs)
            expected = documented.format(bos=tokenizer.bos_token)
            assert tokenizer.decode(ids) == expected, case
            reference = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False, **kwargs
            )
            assert reference == expected, case


async def test_gemma2_refuses_a_system_prompt_at_the_call(
    default_model_dir: Path, templates: Path
) -> None:
    """Gemma 2's template raises on a system message: the engine's typed error, raised
    by stream() itself, with the template's words; nothing is queued."""
    async with engine(default_model_dir) as running:
        running.tokenizer.chat_template = (templates / "google-gemma-2-2b-it.jinja").read_text()
        with pytest.raises(InvalidPromptError, match="System role not supported"):
            running.stream(SYSTEM_CHAT)
        stats = running.stats()
        assert stats["running"] == stats["waiting"] == 0
        params = SamplingParams(temperature=0, max_tokens=4)
        assert [e.token_id async for e in running.stream(CHAT[:1], params)]  # still serving

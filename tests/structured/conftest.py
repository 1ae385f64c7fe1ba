"""The real default model's tokenizer (llguidance's bridge needs a real vocabulary)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="package")
def tokenizer(default_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="package")
def compiler(tokenizer: Any) -> Any:
    from streamgen.structured.compiler import GrammarCompiler

    return GrammarCompiler(tokenizer, eos_token_ids=(tokenizer.eos_token_id,))

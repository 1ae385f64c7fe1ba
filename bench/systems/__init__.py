"""The systems under test, by name; each is built inside its own worker process."""

from __future__ import annotations

import importlib.util
from typing import Any

SYSTEM_NAMES = ("streamgen", "hf", "hf_cb", "llamacpp")

LABELS = {
    "streamgen": "streamgen",
    "hf": "HF generate (static batches)",
    "hf_cb": "HF continuous batching",
    "llamacpp": "llama.cpp (Q4_1, reference)",
}


def build_system(name: str, model: str | None, gguf: str | None, dtype: str, threads: int) -> Any:
    """Load ``name``'s model; raises :class:`~bench.systems.base.Unavailable` if it cannot run."""
    if name == "streamgen":
        from bench.systems.streamgen_engine import StreamgenSystem

        return StreamgenSystem(model, dtype, threads)
    if name == "hf":
        from bench.systems.hf_generate import HFGenerateSystem

        return HFGenerateSystem(model, dtype, threads)
    if name == "hf_cb":
        from bench.systems.hf_continuous import HFContinuousSystem

        return HFContinuousSystem(model, dtype, threads)
    if name == "llamacpp":
        from bench.systems.llamacpp import LlamaCppSystem

        return LlamaCppSystem(gguf, threads)
    raise ValueError(f"unknown system {name!r}; choose from {SYSTEM_NAMES}")


def llama_cpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def precheck(name: str, gguf: str | None) -> str | None:
    """Why ``name`` cannot run here, found without starting a worker (None: try it)."""
    if name == "llamacpp":
        if not llama_cpp_installed():
            return "llama-cpp-python is not installed (pip install -e '.[bench]')"
        if gguf is None:
            return "no GGUF for this model (pass --gguf)"
    if name == "hf_cb":
        from bench.systems.hf_continuous import has_continuous_batching

        if not has_continuous_batching():
            return "this transformers has no continuous batching"
    return None

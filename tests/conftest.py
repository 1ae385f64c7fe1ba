from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

torch.set_num_threads(2)

# Triton kernels run on the CPU through the interpreter; the variable must be
# set before any kernel module is imported (GPU machines run them natively).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module", params=["simd", "scalar"])
def kernels(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Both builds of the native CPU kernels (``streamgen/native``), each in a fresh
    directory: the AVX2 + FMA one (where this CPU has them) and the scalar one."""
    import ctypes

    from streamgen.native import NativeKernels, native_kernels
    from streamgen.native.build import build_library, compile_flags

    if native_kernels() is None:
        pytest.skip("no C compiler here")
    capability = torch.backends.cpu.get_cpu_capability() if request.param == "simd" else "DEFAULT"
    if request.param == "simd" and "-mavx2" not in compile_flags(capability):
        pytest.skip("this CPU has no AVX2")
    path = build_library(tmp_path_factory.mktemp(request.param), capability)
    loaded = NativeKernels(ctypes.CDLL(str(path)))
    assert loaded.simd == (request.param == "simd")
    return loaded


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The real default model (SmolLM2-135M-Instruct), built into the cache once."""
    from streamgen.checkpoint import default_model_path

    return default_model_path(progress=True)

@pytest.fixture(scope="session")
def tokenizer(default_model_dir: Path) -> Any:
    """The real default model's HF tokenizer (llguidance's bridge needs a real vocabulary)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="session")
def compiler(tokenizer: Any) -> Any:
    """A structured-output compiler over that tokenizer."""
    from streamgen.structured.compiler import GrammarCompiler

    return GrammarCompiler(tokenizer, eos_token_ids=(tokenizer.eos_token_id,))


# Shared torch-free fakes (property_tests/fake_runner.py) for the scheduler tests.
sys.path.insert(0, str(Path(__file__).parents[1] / "property_tests"))

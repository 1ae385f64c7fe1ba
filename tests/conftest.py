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


# The native CPU kernels' variants: (build, STREAMGEN_NATIVE_ISA). The ISA picks
# attention's inner loops (attention_kernels.h): the build's own, or AVX-512's.
KERNEL_VARIANTS = {"simd": ("simd", "avx2"), "scalar": ("DEFAULT", "scalar"),
                   "avx512": ("simd", "avx512vnni")}


@pytest.fixture(scope="module", params=list(KERNEL_VARIANTS))
def kernels(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Every variant of the native CPU kernels (``streamgen/native``) this CPU runs, each
    built in a fresh directory: the AVX2 + FMA build with its own attention loops, the
    scalar build, and the AVX2 + FMA build with AVX-512 attention loops. The ISA is set
    in ``STREAMGEN_NATIVE_ISA`` while the module's tests run."""
    import ctypes

    from streamgen.native import NativeKernels, native_kernels
    from streamgen.native.build import build_library, compile_flags
    from streamgen.native.qkernels import ISA_ENV_VAR, Isa, supported_isas

    if native_kernels() is None:
        pytest.skip("no C compiler here")
    build, isa = KERNEL_VARIANTS[request.param]
    capability = torch.backends.cpu.get_cpu_capability() if build == "simd" else "DEFAULT"
    if build == "simd" and "-mavx2" not in compile_flags(capability):
        pytest.skip("this CPU has no AVX2")
    if Isa[isa.upper()] not in supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    path = build_library(tmp_path_factory.mktemp(request.param), capability)
    loaded = NativeKernels(ctypes.CDLL(str(path)))
    assert loaded.simd == (build == "simd")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(ISA_ENV_VAR, isa)
        yield loaded


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

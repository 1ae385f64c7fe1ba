"""llama.cpp's own `llama-bench` and `llama-server`, built from the llama.cpp source that
the llama-cpp-python 0.3.36 sdist vendors, once per machine (cached).

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36
    cmake -B build -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release   (GGML_NATIVE: this CPU)
    cmake --build build --target llama-server llama-bench

The build lands in ``$STREAMGEN_HOME/bench/llama.cpp-0.3.36-<cpu key>/`` where the key
hashes the CPU's flags (llama.cpp builds for the machine it is on, as its users do), so
a cache carried to another CPU builds anew. A few minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.3.36"
TARGETS = ("llama-server", "llama-bench")


def cpu_flags() -> list[str]:
    """The CPU's flags from /proc/cpuinfo (empty where it cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(line.split(":", 1)[1].split())
    except OSError:
        pass
    return []


SIMD_FLAGS = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
              "avx512_vnni", "avx512_bf16", "amx_int8")  # fmt: skip


def simd_flags() -> list[str]:
    """The flags that decide which kernels run (what every benchmark record names)."""
    flags = set(cpu_flags())
    return [f for f in SIMD_FLAGS if f in flags]


# The instruction sets a build may use: "native" is llama.cpp's default (GGML_NATIVE:
# everything this CPU has); "avx2" stops at AVX2 + FMA + F16C, the kernels an AVX2-only
# machine runs (an emulation of one on a newer CPU: same code, this machine's memory).
ISA_CMAKE_FLAGS = {
    "native": (),
    "avx2": ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON",
             "-DGGML_F16C=ON", "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=OFF",
             "-DGGML_AVX512_VNNI=OFF", "-DGGML_AVX512_BF16=OFF", "-DGGML_AVX512_VBMI=OFF"),
}  # fmt: skip


def build_dir(isa: str = "native") -> Path:
    from streamgen.checkpoint import streamgen_home

    key = hashlib.sha256(" ".join(cpu_flags()).encode()).hexdigest()[:12]
    suffix = "" if isa == "native" else f"-{isa}"
    return streamgen_home() / "bench" / f"llama.cpp-{VERSION}-{key}{suffix}"


def tool(name: str, isa: str = "native") -> Path:
    """The path of a built llama.cpp tool, building the set on first use."""
    path = build_dir(isa) / "bin" / name
    if not path.is_file():
        build(isa)
    return path


def _vendored_source(work: Path) -> Path:
    """Download the sdist into ``work`` and unpack it: the llama.cpp tree it vendors."""
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={VERSION}", "-d", str(work)])  # fmt: skip
    sdist = next(work.glob("llama_cpp_python-*.tar.gz"))
    with tarfile.open(sdist) as archive:
        archive.extractall(work, filter="data")
    return next(work.glob("llama_cpp_python-*")) / "vendor" / "llama.cpp"


# The Python side of llama.cpp: its HF -> GGUF converter and the gguf package it uses,
# and the models' chat templates it keeps (tests/engine/test_family_chat_templates.py).
CONVERTER_PATHS = ("convert_hf_to_gguf.py", "conversion", "gguf-py", "models/templates")


def converter_dir() -> Path:
    """llama.cpp's own ``convert_hf_to_gguf.py`` (with ``conversion/``, ``gguf-py/`` and
    ``models/templates/``), unpacked from the sdist once into
    ``$STREAMGEN_HOME/bench/llama.cpp-<version>-convert``."""
    from streamgen.checkpoint import streamgen_home

    target = streamgen_home() / "bench" / f"llama.cpp-{VERSION}-convert"
    if all((target / name).exists() for name in CONVERTER_PATHS):
        return target
    with tempfile.TemporaryDirectory(prefix="llama-cpp-convert-") as tmp:
        source = _vendored_source(Path(tmp))
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for name in CONVERTER_PATHS:
            (staging / name).parent.mkdir(parents=True, exist_ok=True)
            if (source / name).is_dir():
                shutil.copytree(source / name, staging / name)
            else:
                shutil.copy2(source / name, staging / name)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def build(isa: str = "native") -> Path:
    """Download the sdist, build TARGETS for ``isa`` (ISA_CMAKE_FLAGS), install them into
    build_dir(isa)."""
    target = build_dir(isa)
    with tempfile.TemporaryDirectory(prefix="llama-cpp-build-") as tmp:
        work = Path(tmp)
        source = _vendored_source(work)
        out = work / "build"
        _run(["cmake", "-S", str(source), "-B", str(out), "-DLLAMA_CURL=OFF",
              "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
              *ISA_CMAKE_FLAGS[isa]])  # fmt: skip
        _run(["cmake", "--build", str(out), "-j", "2", "--target", *TARGETS])
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "bin").mkdir(parents=True)
        for name in TARGETS:
            shutil.copy2(out / "bin" / name, staging / "bin" / name)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def _run(command: list[str]) -> None:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")

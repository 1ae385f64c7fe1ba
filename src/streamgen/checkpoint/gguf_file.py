"""A fast, strict reader of a GGUF file's header: metadata scalars and tensor infos.

``gguf.GGUFReader`` builds a numpy view for every metadata item (a 49k-token vocabulary
takes seconds); serving needs only the scalars and where each tensor lies, so this
reader walks the header with ``struct`` and skips arrays by their lengths. Tensor data
is then a memory-mapped slice, read only when repacked.

Everything is checked before it is used: the magic and version, every length against
the file's size, each tensor's type, dimensions and byte range (a truncated file names
the first tensor that does not fit). Errors are :class:`ModelLoadError` naming the
file and the key or tensor.

Layout (GGUF v2/v3, little-endian)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 type, value)        string = u64 length + bytes
    n_tensors x (string name, u32 n_dims, n_dims x u64 dim, u32 ggml type, u64 offset)
    padding to general.alignment (default 32) | tensor data (offsets relative to here)
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from streamgen.errors import ModelLoadError

_SCALARS = {  # GGUF value type -> struct format
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_MAX_DIMS = 4
_SMALL_ARRAY = 64  # arrays up to this length are kept (rope tables, ...); longer ones skipped


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: fastest axis first
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def type_name(self) -> str:
        from gguf import GGMLQuantizationType

        try:
            return GGMLQuantizationType(self.ggml_type).name
        except ValueError:
            return f"type {self.ggml_type}"


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    def array(self, name: str) -> np.ndarray:  # [nbytes] uint8, memory-mapped
        info = self.tensors[name]
        return np.memmap(
            self.path, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.nbytes,)
        )


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(
            f"{self.path.name}: {what} (at byte {self.pos}): not a valid GGUF file"
        )

    def take(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise self.fail(f"truncated while reading {what}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        length = self.take("<Q", what)
        if self.pos + length > len(self.buf):
            raise self.fail(f"truncated string in {what}")
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise self.fail(f"{what} is not UTF-8") from err

    def value(self, kind: int, what: str) -> Any:
        if kind in _SCALARS:
            return self.take(_SCALARS[kind], what)
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            item_kind = self.take("<I", what)
            count = self.take("<Q", what)
            if item_kind in _SCALARS:
                size = struct.calcsize(_SCALARS[item_kind])
                if self.pos + size * count > len(self.buf):
                    raise self.fail(f"truncated array {what}")
                if count > _SMALL_ARRAY:
                    self.pos += size * count
                    return None
                return [self.value(item_kind, what) for _ in range(count)]
            if item_kind == _STRING:
                for _ in range(count):  # skipped: the tokenizer is read by gguf itself
                    length = self.take("<Q", what)
                    if self.pos + length > len(self.buf):
                        raise self.fail(f"truncated string in {what}")
                    self.pos += length
                return None
            raise self.fail(f"{what} holds arrays of type {item_kind}")
        raise self.fail(f"{what} has unknown value type {kind}")


def read_gguf_file(path: Path) -> GGUFFile:
    """The header of ``path``, every tensor's byte range checked against the file."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        with open(path, "rb") as handle:
            buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as err:  # ValueError: an empty file cannot be mapped
        raise ModelLoadError(f"cannot read GGUF file {path}: {err}") from err
    try:
        cur = _Cursor(buf, path)
        if len(buf) < 4 or bytes(buf[:4]) != b"GGUF":
            raise ModelLoadError(f"{path.name}: no GGUF magic: not a GGUF file")
        cur.pos = 4
        version = cur.take("<I", "version")
        if version not in (2, 3):
            raise ModelLoadError(f"{path.name}: GGUF version {version} is not supported (2, 3)")
        n_tensors = cur.take("<Q", "tensor count")
        n_kv = cur.take("<Q", "metadata count")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise cur.fail(f"implausible counts ({n_tensors} tensors, {n_kv} metadata items)")
        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            metadata[key] = cur.value(cur.take("<I", key), key)
        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            n_dims = cur.take("<I", name)
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ModelLoadError(f"{path.name}: tensor {name} has {n_dims} dimensions")
            shape = tuple(cur.take("<Q", name) for _ in range(n_dims))
            ggml_type = cur.take("<I", name)
            infos.append((name, shape, ggml_type, cur.take("<Q", name)))
        alignment = int(metadata.get("general.alignment", 32) or 32)
        data_start = -(-cur.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, shape, ggml_type, offset in infos:
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError) as err:
                raise ModelLoadError(
                    f"{path.name}: tensor {name} has unknown type {ggml_type}"
                ) from err
            if any(d <= 0 for d in shape) or shape[0] % block:
                raise ModelLoadError(
                    f"{path.name}: tensor {name} has shape {shape}, not whole blocks of {block}"
                )
            elements = int(np.prod(shape, dtype=np.int64))
            nbytes = elements // block * type_size
            start = data_start + offset
            if offset % alignment or start + nbytes > len(buf):
                raise ModelLoadError(
                    f"{path.name}: tensor {name} ({nbytes} bytes at {start}) lies outside the "
                    f"file ({len(buf)} bytes): truncated or corrupt"
                )
            if name in tensors:
                raise ModelLoadError(f"{path.name}: tensor {name} appears twice")
            tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
        return GGUFFile(path, version, metadata, tensors)
    finally:
        buf.close()

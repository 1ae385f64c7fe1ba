"""GGUF files served directly: lossless repacking, strict header checks, typed errors.

The reference for every value is ``gguf.quants.dequantize`` of the tensor as
``gguf.GGUFReader`` reads it (the ``gguf`` package, independent of streamgen's reader
and repacking).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from gguf_files import (
    SUPPORTED,
    quantized_bytes,
    tiny_llama_tensors,
    write_tensors,
    write_tiny_llama,
)

from streamgen.checkpoint.gguf_file import read_gguf_file
from streamgen.checkpoint.gguf_model import read_gguf
from streamgen.checkpoint.gguf_quants import BY_GGML_NAME, packed_weight, unpack
from streamgen.errors import ModelLoadError, UnsupportedModelError
from streamgen.native.qkernels import QuantContext


@pytest.fixture(scope="module")
def ctx() -> QuantContext:
    return QuantContext.create(threads=1)


@pytest.fixture(scope="module")
def every_type_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tensor of each supported type; 40 rows (not a multiple of 16), 512 inputs."""
    rng = np.random.default_rng(0)
    tensors = {
        f"t.{name}": (quantized_bytes(rng.standard_normal((40, 512)), name, rng), name)
        for name in SUPPORTED
    }
    tensors["t.F32"] = (rng.standard_normal((3, 64)), "F32")
    tensors["t.F16"] = (rng.standard_normal((3, 64)), "F16")
    return write_tensors(tmp_path_factory.mktemp("gguf") / "types.gguf", tensors)


@pytest.mark.parametrize("type_name", SUPPORTED)
def test_repacking_is_lossless(every_type_file: Path, ctx: QuantContext, type_name: str) -> None:
    header = read_gguf_file(every_type_file)
    info = header.tensors[f"t.{type_name}"]
    assert info.type_name == type_name and info.shape == (512, 40)
    raw = header.array(info.name).reshape(40, -1)
    weight = packed_weight(unpack(np.asarray(raw), BY_GGML_NAME[type_name], 512))
    reference = next(t for t in GGUFReader(every_type_file).tensors if t.name == info.name)
    expected = dequantize(reference.data, GGMLQuantizationType[type_name])
    got = ctx.dequantize(weight).numpy()
    np.testing.assert_array_equal(got, expected)
    assert got.dtype == np.float32


def test_header_lists_every_tensor_with_its_byte_range(every_type_file: Path) -> None:
    header = read_gguf_file(every_type_file)
    reader = GGUFReader(every_type_file)
    assert set(header.tensors) == {t.name for t in reader.tensors}
    for t in reader.tensors:
        info = header.tensors[t.name]
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert info.ggml_type == int(t.tensor_type)


def test_truncated_file_names_the_tensor_that_does_not_fit(
    every_type_file: Path, tmp_path: Path
) -> None:
    data = every_type_file.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(ModelLoadError, match=r"tensor t\.\w+ .*outside the file.*truncated"):
        read_gguf_file(cut)
    cut.write_bytes(data[:30])  # inside the metadata
    with pytest.raises(ModelLoadError, match="truncated"):
        read_gguf_file(cut)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "cannot read GGUF file"),
        (b"GGML" + bytes(40), "no GGUF magic"),
        (b"GGUF" + (7).to_bytes(4, "little") + bytes(16), "version 7"),
        (b"GGUF" + (3).to_bytes(4, "little") + (10**9).to_bytes(8, "little") + bytes(8),
         "implausible counts"),
    ],
)  # fmt: skip
def test_not_a_gguf_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        read_gguf_file(path)


def test_unsupported_architecture_is_refused_before_reading_tensors(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    path = write_tiny_llama(tmp_path / "gpt2.gguf", tiny_llama_tensors(rng), arch="gpt2")
    with pytest.raises(UnsupportedModelError, match="architecture 'gpt2'"):
        read_gguf(path)


def test_unsupported_tensor_type_names_the_tensor(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    tensors = tiny_llama_tensors(rng)
    raw = rng.integers(0, 256, size=(64, 256 // 256 * 84), dtype=np.uint8)  # Q2_K blocks
    tensors["blk.0.ffn_down.weight"] = (raw, "Q2_K")
    path = write_tiny_llama(tmp_path / "q2k.gguf", tensors)
    with pytest.raises(UnsupportedModelError, match=r"blk\.0\.ffn_down\.weight has type Q2_K"):
        read_gguf(path)


def test_shape_against_metadata_names_the_tensor(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tensors = tiny_llama_tensors(rng)
    tensors["blk.0.attn_k.weight"] = (
        quantized_bytes(rng.standard_normal((48, 64)), "Q8_0", rng),
        "Q8_0",
    )
    path = write_tiny_llama(tmp_path / "shape.gguf", tensors)
    with pytest.raises(ModelLoadError, match=r"blk\.0\.attn_k\.weight has shape \(48, 64\)"):
        read_gguf(path)


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    tensors = tiny_llama_tensors(rng)
    del tensors["blk.0.ffn_up.weight"]
    path = write_tiny_llama(tmp_path / "missing.gguf", tensors)
    with pytest.raises(ModelLoadError, match=r"blk\.0\.ffn_up\.weight is missing"):
        read_gguf(path)


def test_missing_metadata_is_named(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    path = write_tensors(tmp_path / "nometa.gguf", tiny_llama_tensors(rng))
    with pytest.raises(ModelLoadError, match=r"llama\.attention\.head_count is missing"):
        read_gguf(path)

"""Small GGUF files written with the ``gguf`` package, for the quantized-loading tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

K_TYPES = ("Q4_K", "Q5_K", "Q6_K")
SUPPORTED = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", *K_TYPES)


def quantized_bytes(
    values: np.ndarray, type_name: str, rng: np.random.Generator
) -> np.ndarray:  # [out, bytes per row] uint8
    """``values [out, in]`` in ``type_name``: llama.cpp's rounding where the ``gguf``
    package has a quantizer, else random blocks with sane fp16 scales (K types)."""
    qtype = GGMLQuantizationType[type_name]
    if type_name not in K_TYPES:
        return quantize(values.astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    out, n = values.shape
    raw = rng.integers(0, 256, size=(out, n // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    scale = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if type_name == "Q6_K":
        blocks[:, 208:210] = scale
    else:
        blocks[:, 0:2] = scale
        blocks[:, 2:4] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
    return raw


def _finish(writer: GGUFWriter, tensors: dict[str, tuple[np.ndarray, str]], path: Path) -> Path:
    for name, (data, type_name) in tensors.items():
        if type_name in ("F32", "F16"):
            writer.add_tensor(name, data.astype(np.float32 if type_name == "F32" else np.float16))
        else:
            writer.add_tensor(name, data, raw_dtype=GGMLQuantizationType[type_name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tensors(
    path: Path, tensors: dict[str, tuple[np.ndarray, str]], arch: str = "llama"
) -> Path:
    """A GGUF file holding ``name -> (values or raw bytes, type name)``."""
    writer = GGUFWriter(str(path), arch)
    return _finish(writer, tensors, path)


def tiny_llama_tensors(
    rng: np.random.Generator,
    *,
    hidden: int = 64,
    inter: int = 256,
    vocab: int = 96,
    heads: int = 4,
    kv_heads: int = 2,
    weight_type: str = "Q8_0",
) -> dict[str, tuple[np.ndarray, str]]:
    """The tensors of a one-layer llama in ``weight_type`` (norms F32)."""
    head_dim = hidden // heads
    shapes = {
        "attn_q": (heads * head_dim, hidden),
        "attn_k": (kv_heads * head_dim, hidden),
        "attn_v": (kv_heads * head_dim, hidden),
        "attn_output": (hidden, heads * head_dim),
        "ffn_gate": (inter, hidden),
        "ffn_up": (inter, hidden),
        "ffn_down": (hidden, inter),
    }
    tensors: dict[str, tuple[np.ndarray, str]] = {
        "token_embd.weight": (
            quantized_bytes(rng.standard_normal((vocab, hidden)), "Q8_0", rng),
            "Q8_0",
        ),
        "output_norm.weight": (np.ones(hidden), "F32"),
        "blk.0.attn_norm.weight": (np.ones(hidden), "F32"),
        "blk.0.ffn_norm.weight": (np.ones(hidden), "F32"),
    }
    for name, shape in shapes.items():
        values = rng.standard_normal(shape) * 0.05
        tensors[f"blk.0.{name}.weight"] = (quantized_bytes(values, weight_type, rng), weight_type)
    return tensors


def write_tiny_llama(
    path: Path,
    tensors: dict[str, tuple[np.ndarray, str]],
    *,
    arch: str = "llama",
    hidden: int = 64,
    inter: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
) -> Path:
    """A one-layer llama GGUF with the metadata streamgen checks (no tokenizer)."""
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(inter)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_context_length(128)
    writer.add_layer_norm_rms_eps(1e-5)
    return _finish(writer, tensors, path)

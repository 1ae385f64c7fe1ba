"""A GGUF file served directly: its tensors stay quantized, repacked for the kernels.

``read_gguf`` returns everything the loader needs to build the runtime model:

* a metadata directory (``config.json`` and the tokenizer, written once from the
  file's metadata into ``$STREAMGEN_HOME/gguf/``, keyed by the file's name, size and
  modification time; weights are never copied there);
* per streamgen weight, either the packed parts (:class:`PackedWeight`, one per GGUF
  tensor, so fused q/k/v and gate/up keep each tensor's own type) or a dense float32
  tensor (F32 / F16 / BF16 tensors, norms).

Every check runs before anything is allocated for the model: unsupported tensor types,
missing tensors and shapes that disagree with the metadata raise
:class:`~streamgen.errors.UnsupportedModelError` / :class:`~streamgen.errors.ModelLoadError`
naming the tensor.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamgen.checkpoint.cache import streamgen_home
from streamgen.checkpoint.gguf_architectures import gguf_architecture
from streamgen.checkpoint.gguf_file import GGUFFile, read_gguf_file
from streamgen.checkpoint.gguf_quants import BY_GGML_NAME, Unpacked, packed_weight, unpack
from streamgen.errors import ModelLoadError, UnsupportedModelError
from streamgen.model.config import ARCHITECTURES, NORM_ROLES
from streamgen.native.qkernels import PackedWeight

DENSE_TYPES = frozenset({"F32", "F16", "BF16"})
# streamgen module -> the GGUF tensors (per layer, fused in this order).
LAYER_PARTS = {
    "self_attn.qkv_proj": ("attn_q", "attn_k", "attn_v"),
    "self_attn.o_proj": ("attn_output",),
    "mlp.gate_up_proj": ("ffn_gate", "ffn_up"),
    "mlp.down_proj": ("ffn_down",),
}
# Phi-3's converter keeps its fused projections: q/k/v in attn_qkv, gate/up in ffn_up.
FUSED_LAYER_PARTS = {
    "self_attn.qkv_proj": ("attn_qkv",),
    "self_attn.o_proj": ("attn_output",),
    "mlp.gate_up_proj": ("ffn_up",),
    "mlp.down_proj": ("ffn_down",),
}
# q / k norms (ModelSpec.qk_norm): per head, or over the whole projection (OLMo 2).
HEAD_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}


# llama.cpp's names of a layer's norms by role (ModelSpec.layer_norm_roles).
ROLE_NORMS = {"attn_in": "attn_norm", "attn_out": "post_attention_norm",
              "mlp_in": "ffn_norm", "mlp_out": "post_ffw_norm"}  # fmt: skip


def layer_norms(qk_norm: bool, placement: str = "pre") -> dict[str, str]:
    """The norm weights of each layer (``qk_norm``: q / k norms; ``placement``:
    ``ModelSpec.norm_placement``): streamgen module -> GGUF tensor stem."""
    norms = {name: ROLE_NORMS[role] for role, name in NORM_ROLES[placement].items()}
    return {**norms, **(HEAD_NORMS if qk_norm else {})}


Weight = tuple[PackedWeight, ...] | torch.Tensor


@dataclass(frozen=True)
class GGUFCheckpoint:
    """The weights of a GGUF file by streamgen module name (``layers.3.mlp.down_proj``),
    and the directory holding its config and tokenizer."""

    path: Path
    metadata_dir: Path
    weights: dict[str, Weight]
    biases: dict[str, torch.Tensor]


def is_gguf_file(path: str | Path) -> bool:
    candidate = Path(path).expanduser()
    return candidate.is_file() and candidate.suffix.lower() == ".gguf"


def read_gguf(path: Path, *, dense: bool = False) -> GGUFCheckpoint:
    """Read ``path``: the header checked, the metadata directory, then every tensor repacked
    (``dense``: every weight dequantized to float32 instead, the same values exactly)."""
    header = read_gguf_file(path)
    architecture = header.metadata.get("general.architecture")
    arch = gguf_architecture(architecture, path.name)
    family = ARCHITECTURES[arch.model_type]
    layer_parts = FUSED_LAYER_PARTS if family.fused_projections else LAYER_PARTS
    def meta_int(key: str, default: int | None = None) -> int:
        value = header.metadata.get(f"{architecture}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{path.name}: metadata {architecture}.{key} is missing")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelLoadError(f"{path.name}: metadata {architecture}.{key} is {value!r}")
        return value

    num_heads = meta_int("attention.head_count")
    num_kv_heads = meta_int("attention.head_count_kv", num_heads)
    layers = meta_int("block_count")
    hidden, inter = meta_int("embedding_length"), meta_int("feed_forward_length")
    tensors = header.tensors
    key_length = header.metadata.get(f"{architecture}.attention.key_length")
    if num_heads <= 0 or num_kv_heads <= 0 or num_heads % num_kv_heads or (
        key_length is None and hidden % num_heads
    ):
        raise ModelLoadError(
            f"{path.name}: {num_heads} heads / {num_kv_heads} KV heads for hidden {hidden}"
        )
    # A head size of its own where the file gives one (Qwen3), else hidden / heads.
    head_dim = meta_int("attention.key_length") if key_length is not None else hidden // num_heads
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    expected_out = {
        "attn_q": q_size,
        "attn_k": kv_size,
        "attn_v": kv_size,
        "attn_qkv": q_size + 2 * kv_size,
        "attn_output": hidden,
        "ffn_gate": inter,
        "ffn_up": 2 * inter if family.fused_projections else inter,
        "ffn_down": hidden,
    }
    expected_in = {"attn_output": q_size, "ffn_down": inter}
    norms = layer_norms(family.qk_norm, family.norm_placement)
    # q / k norms: per head (Qwen3, Gemma 3), or over the whole projection (OLMo 2)
    norm_widths = {"attn_q_norm": q_size if family.qk_norm_whole else head_dim,
                   "attn_k_norm": kv_size if family.qk_norm_whole else head_dim}  # fmt: skip

    def tensor(name: str) -> Any:
        if name not in tensors:
            raise ModelLoadError(f"{path.name}: tensor {name} is missing")
        return tensors[name]

    def check_shape(name: str, shape: tuple[int, ...]) -> None:
        actual = tuple(int(d) for d in reversed(tensor(name).shape))  # numpy order
        if actual != shape:
            raise ModelLoadError(f"{path.name}: tensor {name} has shape {actual}, expected {shape}")

    # Pass 1: every check, nothing allocated.
    embed_shape = tensor("token_embd.weight").shape
    vocab = int(embed_shape[-1])
    check_shape("token_embd.weight", (vocab, hidden))
    check_shape("output_norm.weight", (hidden,))
    if "output.weight" in tensors:
        check_shape("output.weight", (vocab, hidden))
    for i in range(layers):
        for part in (p for parts in layer_parts.values() for p in parts):
            shape = (expected_out[part], expected_in.get(part, hidden))
            check_shape(f"blk.{i}.{part}.weight", shape)
        for norm in norms.values():
            check_shape(f"blk.{i}.{norm}.weight", (norm_widths.get(norm, hidden),))
    for t in tensors.values():
        kind = t.type_name
        if kind not in BY_GGML_NAME and kind not in DENSE_TYPES:
            raise UnsupportedModelError(
                f"{path.name}: tensor {t.name} has type {kind}; supported: "
                f"{sorted(BY_GGML_NAME) + sorted(DENSE_TYPES)}"
            )
        if (t.name.endswith(".bias") or "norm" in t.name) and kind not in DENSE_TYPES:
            raise UnsupportedModelError(f"{path.name}: tensor {t.name} is quantized ({kind})")

    # Pass 2: the config and tokenizer (written once), then repack.
    metadata_dir = _metadata_dir(path, header)

    def read(name: str, rotary_heads: int = 0) -> Unpacked | np.ndarray:
        t = tensor(name)
        out = int(t.shape[-1]) if len(t.shape) > 1 else int(t.shape[0])
        order = None
        if rotary_heads:
            from streamgen.checkpoint.gguf_convert import unpermute_rotary_rows

            order = unpermute_rotary_rows(np.arange(out)[:, None], rotary_heads)[:, 0]
        raw = header.array(name).reshape(out, -1)
        if t.type_name in DENSE_TYPES:
            from gguf import GGMLQuantizationType
            from gguf.quants import dequantize

            values = dequantize(raw, GGMLQuantizationType(t.ggml_type)).astype(np.float32)
            values = values.reshape(out, -1) if len(t.shape) > 1 else values.reshape(-1)
            return np.ascontiguousarray(values if order is None else values[order])
        if order is not None:
            raw = raw[order]
        return unpack(np.asarray(raw), BY_GGML_NAME[t.type_name], int(t.shape[0]))

    def weight(parts: list[Unpacked | np.ndarray]) -> Weight:
        """Packed parts where every part is quantized and all but the last fill whole row
        groups (and not ``dense``); otherwise one float32 tensor of the exact values."""
        fit = all(u.q.shape[0] % 16 == 0 for u in parts[:-1] if isinstance(u, Unpacked))
        if not dense and fit and all(isinstance(u, Unpacked) for u in parts):
            return tuple(packed_weight(u) for u in parts if isinstance(u, Unpacked))
        values = [u.dequantize() if isinstance(u, Unpacked) else u for u in parts]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(values)))

    weights: dict[str, Weight] = {}
    biases: dict[str, torch.Tensor] = {}
    weights["embed_tokens"] = weight([read("token_embd.weight")])
    if "output.weight" in tensors:
        weights["lm_head"] = weight([read("output.weight")])
    weights["norm"] = _dense(read("output_norm.weight"))
    rotary = {"attn_q": num_heads, "attn_k": num_kv_heads} if arch.rotary_rows_permuted else {}
    for i in range(layers):
        for module, parts in layer_parts.items():
            weights[f"layers.{i}.{module}"] = weight(
                [read(f"blk.{i}.{p}.weight", rotary.get(p, 0)) for p in parts]
            )
            bias_names = [f"blk.{i}.{p}.bias" for p in parts]
            if all(b in tensors for b in bias_names):
                biases[f"layers.{i}.{module}"] = torch.cat(
                    [
                        _dense(read(b, rotary.get(p, 0)))
                        for b, p in zip(bias_names, parts, strict=True)
                    ]
                )
        for module, norm in norms.items():
            weights[f"layers.{i}.{module}"] = _dense(read(f"blk.{i}.{norm}.weight"))
    return GGUFCheckpoint(path, metadata_dir, weights, biases)


def _dense(value: Unpacked | np.ndarray) -> torch.Tensor:  # norms and biases (checked dense)
    assert not isinstance(value, Unpacked)
    return torch.from_numpy(np.array(value, dtype=np.float32))


# What _metadata_dir's files hold: raised whenever write_config_and_tokenizer writes them
# differently, so a directory an older streamgen cached is written anew (2: llama.cpp's
# sentencepiece whitespace rule).
METADATA_FORMAT = 2


def _metadata_dir(path: Path, header: GGUFFile) -> Path:
    from streamgen.checkpoint.gguf_convert import write_config_and_tokenizer

    stat = path.stat()
    key = hashlib.sha256(
        f"{METADATA_FORMAT}\0{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()
    ).hexdigest()
    target = streamgen_home() / "gguf" / f"{path.stem}-{key[:16]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".build-"))
    try:
        write_config_and_tokenizer(path, header, tmp)
        try:
            os.replace(tmp, target)  # atomic; a concurrent builder may have won
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

"""An HF config from a GGUF file's metadata, read the way llama.cpp reads it.

transformers' GGUF import knows only some architectures (not granite or olmo2) and
drops fields the others need (Gemma's soft-caps and query scale, Phi-3's partial rotary
and long-context rope), so the config is built here from a table:

* ``COMMON_KEYS``: the hyperparameters every architecture writes
  (``{arch}.block_count`` -> ``num_hidden_layers``, ...);
* per architecture (:class:`~streamgen.checkpoint.gguf_architectures.GGUFArchitecture`):
  its own keys (``config_keys``), fixed fields (``config_fixed``) and a derivation
  (``derive``, below) for what llama.cpp infers rather than reads: Gemma's sliding-layer
  pattern, local rope base and query scale, Phi-3's rope factors (tensors, not keys).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from streamgen.errors import ModelLoadError

# "{arch}.<key>" -> HF config field, for every architecture.
COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
    "rope.freq_base": "rope_theta",
}
# tokenizer.ggml.<key> -> HF config field
TOKEN_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
              "padding_token_id": "pad_token_id"}  # fmt: skip

# What a derivation sees: the file's metadata (keys without the architecture prefix
# under `meta`), the fields so far, and a reader of small F32 tensors by name.
TensorReader = Callable[[str], "np.ndarray | None"]
Derive = Callable[[Mapping[str, Any], dict[str, Any], TensorReader], None]


def config_fields(
    architecture: str,
    metadata: Mapping[str, Any],
    *,
    keys: Mapping[str, str],
    fixed: Mapping[str, Any],
    derive: Derive | None,
    vocab_size: int,
    tied: bool,
    read_tensor: TensorReader,
) -> dict[str, Any]:
    """The HF config fields of a file of ``architecture`` (``metadata``: its key/values)."""
    prefix = f"{architecture}."
    meta = {k[len(prefix) :]: v for k, v in metadata.items() if k.startswith(prefix)}
    fields: dict[str, Any] = {"vocab_size": vocab_size, "tie_word_embeddings": tied}
    for key, field in {**COMMON_KEYS, **keys}.items():
        if key in meta:
            fields[field] = meta[key]
    for key, field in TOKEN_KEYS.items():
        if f"tokenizer.ggml.{key}" in metadata:
            fields[field] = metadata[f"tokenizer.ggml.{key}"]
    fields.update(fixed)
    if derive is not None:
        derive(meta, fields, read_tensor)
    return fields


def _query_scale(meta: Mapping[str, Any], fields: dict[str, Any], big_layers: int) -> None:
    """llama.cpp's Gemma query scale: 1 / sqrt(head size), but 1 / sqrt(hidden / heads)
    for the 27B models (identified by their layer count)."""
    heads = int(fields["num_attention_heads"])
    head_dim = int(fields.get("head_dim") or fields["hidden_size"] // heads)
    big = fields["num_hidden_layers"] == big_layers
    fields["query_pre_attn_scalar"] = fields["hidden_size"] // heads if big else head_dim


def _sliding_layers(meta: Mapping[str, Any], layers: int, pattern: int) -> list[str]:
    """Per layer ``sliding_attention`` / ``full_attention``: the file's pattern (a list
    of flags, or every n-th layer global), else llama.cpp's default ``pattern``."""
    value = meta.get("attention.sliding_window_pattern", pattern)
    if isinstance(value, list | tuple):
        if len(value) != layers:
            raise ModelLoadError(f"sliding_window_pattern has {len(value)} of {layers} layers")
        flags = [bool(v) for v in value]
    else:
        n = int(value)
        flags = [n == 0 or i % n < n - 1 for i in range(layers)]
    return ["sliding_attention" if f else "full_attention" for f in flags]


def derive_gemma2(meta: Mapping[str, Any], fields: dict[str, Any], read: TensorReader) -> None:
    """Gemma 2: every other layer sliding (window 4096 unless written), soft-caps."""
    _query_scale(meta, fields, big_layers=46)
    fields.setdefault("sliding_window", 4096)
    fields["layer_types"] = _sliding_layers(meta, int(fields["num_hidden_layers"]), 2)
    if "rope.freq_base_swa" in meta and meta["rope.freq_base_swa"] != fields.get("rope_theta"):
        raise ModelLoadError("gemma2: a sliding-layer rope base of its own is not supported")


def derive_gemma3(meta: Mapping[str, Any], fields: dict[str, Any], read: TensorReader) -> None:
    """Gemma 3: five sliding layers in six (when the file has a window), their rope base
    10,000 unless written; linear rope scaling on the global layers."""
    _query_scale(meta, fields, big_layers=62)
    layers = int(fields["num_hidden_layers"])
    if int(fields.get("sliding_window") or 0) > 0:
        fields["layer_types"] = _sliding_layers(meta, layers, 6)
    else:
        fields["layer_types"] = ["full_attention"] * layers
    fields["rope_local_base_freq"] = float(meta.get("rope.freq_base_swa", 10_000.0))
    kind = meta.get("rope.scaling.type")
    if kind == "linear":
        fields["rope_scaling"] = {
            "rope_type": "linear", "factor": float(meta["rope.scaling.factor"]),
        }  # fmt: skip
    elif kind not in (None, "none"):
        raise ModelLoadError(f"gemma3: rope scaling {kind!r} is not supported")


def derive_phi3(meta: Mapping[str, Any], fields: dict[str, Any], read: TensorReader) -> None:
    """Phi-3: partial rotary from the rotated dimensions, no window where it is 0, and
    long-context rope from the ``rope_factors_long`` / ``_short`` tensors."""
    heads = int(fields["num_attention_heads"])
    head_dim = int(fields.get("head_dim") or fields["hidden_size"] // heads)
    rotated = int(meta.get("rope.dimension_count", head_dim))
    fields["partial_rotary_factor"] = rotated / head_dim
    if not fields.get("sliding_window"):
        fields["sliding_window"] = None
    long, short = read("rope_factors_long.weight"), read("rope_factors_short.weight")
    if (long is None) != (short is None):
        raise ModelLoadError("phi3: one of rope_factors_long / rope_factors_short is missing")
    if long is not None and short is not None:
        if long.shape != (rotated // 2,) or short.shape != long.shape:
            raise ModelLoadError(
                f"phi3: rope factors of shape {long.shape} / {short.shape}, "
                f"expected ({rotated // 2},)"
            )
        original = meta.get("rope.scaling.original_context_length")
        if original is None:
            raise ModelLoadError("phi3: rope factors without rope.scaling.original_context_length")
        fields["original_max_position_embeddings"] = int(original)
        fields["rope_scaling"] = {
            "rope_type": "longrope",
            "long_factor": [float(x) for x in long],
            "short_factor": [float(x) for x in short],
        }

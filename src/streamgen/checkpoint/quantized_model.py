"""Build the runtime model over quantized weights: from a GGUF file's own types, or by
quantizing a dense checkpoint at load (``EngineConfig(quantization="q8_0")``).

Quantize-at-load rounds as llama.cpp's reference quantizers do (the ``gguf`` package's
for the legacy types, ``native/kquant.c`` for Q4_K), so a checkpoint quantized here
holds the same values as the same checkpoint converted by ``llama-quantize`` without an
importance matrix. As there, a tensor whose rows do not split into 256-value blocks
falls back to Q5_0.
"""

from __future__ import annotations

import numpy as np
import torch

from streamgen.checkpoint.gguf_model import LAYER_PARTS, Weight, layer_norms
from streamgen.checkpoint.gguf_quants import BY_GGML_NAME, FORMATS, packed_weight, unpack
from streamgen.checkpoint.quantization import FALLBACK_TYPE, QUANTIZE_AT_LOAD
from streamgen.errors import ConfigError
from streamgen.model.config import ModelSpec
from streamgen.model.linear import Linear
from streamgen.model.llama import LlamaModel
from streamgen.model.quantized import PackedLinear, QuantizedEmbedding
from streamgen.native.kernels import NativeKernels
from streamgen.native.qkernels import QuantContext

_LINEARS = tuple(LAYER_PARTS)


def quantize_tensor(values: np.ndarray, ggml_name: str, ctx: QuantContext) -> np.ndarray:
    """``values [out, in]`` f32 -> the GGUF bytes ``[out, row bytes]`` of type ``ggml_name``."""
    if ggml_name == "Q4_K":
        return ctx.quantize_q4_k(values)
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    raw: np.ndarray = quantize(values, GGMLQuantizationType[ggml_name])
    return raw


def tensor_type(ggml_name: str, in_features: int) -> str | None:
    """The type a tensor with rows of ``in_features`` takes when ``ggml_name`` is asked
    for (llama.cpp's fallback where the rows do not fit), or None: it stays dense."""
    fmt = FORMATS[BY_GGML_NAME[ggml_name]]
    if in_features % fmt.tile_inputs:
        fallback = FALLBACK_TYPE.get(ggml_name)
        return None if fallback is None else tensor_type(fallback, in_features)
    return ggml_name


def quantize_state(
    state: dict[str, torch.Tensor], spec: ModelSpec, scheme: str, ctx: QuantContext
) -> dict[str, Weight]:
    """A fused dense state dict (``layers.0.self_attn.qkv_proj.weight``, ...) -> weights
    in ``scheme`` (linear layers and embeddings; norms stay float32)."""

    def packed(tensor: torch.Tensor) -> Weight:
        values = np.ascontiguousarray(tensor.detach().float().numpy())
        ggml_name = tensor_type(QUANTIZE_AT_LOAD[scheme], values.shape[1])
        if ggml_name is None:
            return tensor.detach().float()
        raw = quantize_tensor(values, ggml_name, ctx)
        return (packed_weight(unpack(raw, BY_GGML_NAME[ggml_name], values.shape[1])),)

    weights: dict[str, Weight] = {
        "embed_tokens": packed(state["embed_tokens.weight"]),
        "norm": state["norm.weight"].float(),
    }
    if not spec.tie_word_embeddings:
        weights["lm_head"] = packed(state["lm_head.weight"])
    for i in range(spec.num_layers):
        for name in _LINEARS:
            weights[f"layers.{i}.{name}"] = packed(state[f"layers.{i}.{name}.weight"])
        for norm in layer_norms(spec.qk_norm, spec.norm_placement):
            weights[f"layers.{i}.{norm}"] = state[f"layers.{i}.{norm}.weight"].float()
    return weights


def build_quantized_model(
    spec: ModelSpec,
    weights: dict[str, Weight],
    biases: dict[str, torch.Tensor],
    ctx: QuantContext,
    kernels: NativeKernels | None,
    *,
    activation_bits: int = 8,
) -> LlamaModel:
    """The runtime model (float32 activations and KV cache) over ``weights``.

    ``activation_bits``: 8 quantizes each layer input once to int8 per 32 (llama.cpp's
    arithmetic); 16 twice (the residual too), about 20% slower at batch 1 and as close to
    the dense model as float32 rounding. The LM head always takes 16."""
    wide = activation_bits == 16
    with torch.device("meta"):
        model = LlamaModel(spec)
    model.init_rope(torch.device("cpu"))
    embed = weights["embed_tokens"]
    if isinstance(embed, tuple):
        model.embed_tokens = QuantizedEmbedding(embed[0], ctx)
    else:
        model.embed_tokens = torch.nn.Embedding.from_pretrained(embed.float(), freeze=True)
    model.norm.weight = torch.nn.Parameter(_dense(weights["norm"]), requires_grad=False)
    head = weights.get("lm_head", embed)
    _install(model.lm_head, head, None, ctx, kernels, residual_activations=True)
    for i, layer in enumerate(model.layers):
        for name in _LINEARS:
            key = f"layers.{i}.{name}"
            _install(
                layer.get_submodule(name),
                weights[key],
                biases.get(key),
                ctx,
                kernels,
                residual_activations=wide,
            )
        for norm in layer_norms(spec.qk_norm, spec.norm_placement):
            layer.get_submodule(norm).weight = torch.nn.Parameter(
                _dense(weights[f"layers.{i}.{norm}"]), requires_grad=False
            )
    return model


def _dense(weight: Weight) -> torch.Tensor:
    if isinstance(weight, tuple):
        raise ConfigError("a norm weight cannot be quantized")
    return weight.float().contiguous()


def _install(
    module: torch.nn.Module,
    weight: Weight,
    bias: torch.Tensor | None,
    ctx: QuantContext,
    kernels: NativeKernels | None,
    *,
    residual_activations: bool = False,
) -> None:
    assert isinstance(module, Linear)
    if isinstance(weight, tuple):
        parts, start = [], 0
        for part in weight:
            part_bias = None if bias is None else bias[start : start + part.out_features]
            parts.append(part.with_bias(part_bias))
            start += part.out_features
        packed = PackedLinear(tuple(parts), ctx, residual_activations=residual_activations)
        module.set_packed(packed, kernels)
        return
    module.bias = None if bias is None else torch.nn.Parameter(bias.float(), requires_grad=False)
    module.set_weight(weight.float().contiguous(), None)
    module.enable_native(kernels)

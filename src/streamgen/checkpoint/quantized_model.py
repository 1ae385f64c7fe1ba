"""Build the runtime model over quantized weights: from a GGUF file's own types, or by
quantizing a dense checkpoint at load (``EngineConfig(quantization="q8_0")``).

Quantize-at-load uses the ``gguf`` package's quantizers, which round as llama.cpp's
reference code does, so a checkpoint quantized here holds the same values as the same
checkpoint converted to that type by llama.cpp's tools.
"""

from __future__ import annotations

import torch

from streamgen.checkpoint.gguf_model import LAYER_NORMS, LAYER_PARTS, Weight
from streamgen.checkpoint.gguf_quants import BY_GGML_NAME, packed_weight, unpack
from streamgen.checkpoint.quantization import QUANTIZE_AT_LOAD
from streamgen.errors import ConfigError
from streamgen.model.config import ModelSpec
from streamgen.model.linear import Linear
from streamgen.model.llama import LlamaModel
from streamgen.model.quantized import PackedLinear, QuantizedEmbedding
from streamgen.model.rope import rope_inv_freq
from streamgen.native.kernels import NativeKernels
from streamgen.native.qkernels import PackedWeight, QuantContext

_LINEARS = tuple(LAYER_PARTS)
_NORMS = tuple(LAYER_NORMS)


def quantize_state(
    state: dict[str, torch.Tensor], spec: ModelSpec, scheme: str
) -> dict[str, Weight]:
    """A fused dense state dict (``layers.0.self_attn.qkv_proj.weight``, ...) -> weights
    in ``scheme`` (linear layers and embeddings; norms stay float32)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    ggml = GGMLQuantizationType[QUANTIZE_AT_LOAD[scheme]]
    qtype = BY_GGML_NAME[QUANTIZE_AT_LOAD[scheme]]

    def packed(tensor: torch.Tensor) -> tuple[PackedWeight, ...]:
        values = np.ascontiguousarray(tensor.detach().float().numpy())
        raw = quantize(values, ggml)
        return (packed_weight(unpack(raw, qtype, values.shape[1])),)

    weights: dict[str, Weight] = {
        "embed_tokens": packed(state["embed_tokens.weight"]),
        "norm": state["norm.weight"].float(),
    }
    if not spec.tie_word_embeddings:
        weights["lm_head"] = packed(state["lm_head.weight"])
    for i in range(spec.num_layers):
        for name in _LINEARS:
            weights[f"layers.{i}.{name}"] = packed(state[f"layers.{i}.{name}.weight"])
        for norm in _NORMS:
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
    model.inv_freq = rope_inv_freq(spec.rope, spec.head_dim)
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
                layer.get_submodule(name), weights[key], biases.get(key), ctx, kernels,
                residual_activations=wide,
            )
        for norm in _NORMS:
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

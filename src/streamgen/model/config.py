"""The model's shape, read once from an HF config and frozen.

``ModelSpec`` is the only description of the architecture the rest of
streamgen sees; it never holds a reference to the transformers config object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from streamgen.errors import UnsupportedModelError


@dataclass(frozen=True, slots=True)
class Architecture:
    """What sets one HF ``model_type`` apart from Llama (the model's named pieces)."""

    qkv_bias: bool = False  # q/k/v projections carry a bias (unless the config says)
    qk_norm: bool = False  # RMSNorm over each q and k head (head_dim weights) before rope
    qk_norm_whole: bool = False  # OLMo 2: over the whole q / k projection instead
    # where a layer's norms sit (NORM_ROLES): "pre" (on each branch's input: Llama),
    # "post" (on its output: OLMo 2) or "both" (Gemma 3)
    norm_placement: str = "pre"
    norm_offset: float = 0.0  # Gemma: norms scale by (offset + weight), folded in at load
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" or "gelu_tanh" (GeGLU)
    # Gemma 3: embeddings times sqrt(hidden), scores times query_pre_attn_scalar ** -0.5,
    # interleaved sliding-window and global layers (layer_types) with their own rope bases
    gemma_scales: bool = False
    # Phi-3: q/k/v and gate/up stored fused (self_attn.qkv_proj, mlp.gate_up_proj)
    fused_projections: bool = False
    # the config's sliding window applies only with use_sliding_window=True (Qwen)
    window_needs_flag: bool = False
    # Granite: embedding / residual / attention multipliers and a logits divisor, read
    # from the config (embedding_multiplier, residual_multiplier, attention_multiplier,
    # logits_scaling)
    scales_from_config: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(),
    "mistral": Architecture(),
    "qwen2": Architecture(qkv_bias=True, window_needs_flag=True),
    "qwen3": Architecture(qk_norm=True, window_needs_flag=True),
    "granite": Architecture(scales_from_config=True),
    "olmo2": Architecture(qk_norm=True, qk_norm_whole=True, norm_placement="post"),
    "gemma2": Architecture(
        norm_placement="both", norm_offset=1.0, hidden_act="gelu_tanh", gemma_scales=True
    ),
    "gemma3_text": Architecture(
        qk_norm=True, norm_placement="both", norm_offset=1.0, hidden_act="gelu_tanh",
        gemma_scales=True,
    ),
    "phi3": Architecture(fused_projections=True),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(ARCHITECTURES))
# Per norm placement: a layer's norms by role (attention / MLP branch, input / output)
# under their HF module names.
NORM_ROLES: dict[str, dict[str, str]] = {
    "pre": {"attn_in": "input_layernorm", "mlp_in": "post_attention_layernorm"},
    "post": {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"},
    "both": {
        "attn_in": "input_layernorm",
        "attn_out": "post_attention_layernorm",
        "mlp_in": "pre_feedforward_layernorm",
        "mlp_out": "post_feedforward_layernorm",
    },
}
# HF hidden_act names -> streamgen's
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


@dataclass(frozen=True, slots=True)
class RopeSpec:
    """Rotary embedding parameters (HF ``rope_parameters`` / ``rope_scaling``)."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # the share of each head that is rotated (Phi-4-mini: 0.75); the rest passes through
    partial_rotary_factor: float = 1.0
    # longrope (Phi-3): per-frequency divisors for positions before / from the original
    # context length, and the factor cos and sin are scaled by
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Architecture of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, SmolLM2)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    tie_word_embeddings: bool
    qkv_bias: bool
    sliding_window: int | None = None
    qk_norm: bool = False
    qk_norm_whole: bool = False  # the q / k norms span the whole projection (OLMo 2)
    norm_placement: str = "pre"  # see Architecture / NORM_ROLES
    hidden_act: str = "silu"  # "silu" or "gelu_tanh"
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    attn_logit_softcap: float | None = None  # scores = cap * tanh(scores / cap) (Gemma 2)
    # Interleaved local attention (Gemma 3): per layer whether it is a sliding-window one,
    # that window, and the rope those layers use (the others use ``rope``).
    sliding_layers: tuple[bool, ...] = ()
    local_window: int | None = None
    local_rope: RopeSpec | None = None
    fused_projections: bool = False  # checkpoints store qkv_proj / gate_up_proj (Phi-3)
    # x = embed * embedding_scale; h = x + residual_scale * attn(...), and likewise the MLP;
    # scores = q.k * attention_scale (None: head_dim ** -0.5); logits = head(h) / logits_divisor
    embedding_scale: float = 1.0
    residual_scale: float = 1.0
    attention_scale: float | None = None
    logits_divisor: float = 1.0
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def layer_norm_roles(self) -> dict[str, str]:
        """A layer's norms by role (``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_out``)
        under their HF module names (``NORM_ROLES``)."""
        return NORM_ROLES[self.norm_placement]

    def is_sliding(self, layer: int) -> bool:
        return bool(self.sliding_layers) and self.sliding_layers[layer]

    @property
    def softmax_scale(self) -> float:
        """What q.k is multiplied by before the softmax."""
        return self.head_dim**-0.5 if self.attention_scale is None else self.attention_scale

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, config: Any) -> ModelSpec:
        """Build a spec from a ``transformers.PretrainedConfig``.

        Raises :class:`UnsupportedModelError` naming the architecture or the
        feature (rope type, sliding window layout) streamgen does not implement.
        """
        model_type = getattr(config, "model_type", None)
        if model_type not in ARCHITECTURES:
            archs = getattr(config, "architectures", None)
            raise UnsupportedModelError(
                f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
                f"streamgen supports {list(SUPPORTED_MODEL_TYPES)}"
            )
        arch = ARCHITECTURES[model_type]
        num_heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        qkv_bias = bool(getattr(config, "attention_bias", arch.qkv_bias))
        if getattr(config, "mlp_bias", False):
            raise UnsupportedModelError(f"{model_type}: mlp_bias=True is not supported")
        return cls(
            model_type=model_type,
            vocab_size=int(config.vocab_size),
            hidden_size=int(config.hidden_size),
            intermediate_size=int(config.intermediate_size),
            num_layers=int(config.num_hidden_layers),
            num_heads=num_heads,
            num_kv_heads=int(getattr(config, "num_key_value_heads", None) or num_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.rms_norm_eps),
            max_position_embeddings=int(config.max_position_embeddings),
            rope=_rope_spec(config),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            sliding_window=_sliding_window(config, model_type, arch),
            qk_norm=arch.qk_norm,
            qk_norm_whole=arch.qk_norm_whole,
            norm_placement=arch.norm_placement,
            hidden_act=_activation(config, model_type, arch),
            final_logit_softcap=getattr(config, "final_logit_softcapping", None),
            attn_logit_softcap=getattr(config, "attn_logit_softcapping", None),
            **(_gemma_fields(config) if arch.gemma_scales else {}),
            fused_projections=arch.fused_projections,
            **(_config_scales(config) if arch.scales_from_config else {}),
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_ids=_as_id_tuple(getattr(config, "eos_token_id", None)),
        )


def _activation(config: Any, model_type: str, arch: Architecture) -> str:
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    if ACTIVATIONS.get(str(act)) != arch.hidden_act:
        raise UnsupportedModelError(
            f"{model_type}: hidden activation {act!r} (supported: {arch.hidden_act!r})"
        )
    return arch.hidden_act


def _gemma_fields(config: Any) -> dict[str, Any]:
    """Gemma's scales and its interleaved sliding / global layers."""
    layer_types = list(getattr(config, "layer_types", None) or [])
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    params = dict(getattr(config, "rope_parameters", None) or {})
    local = params.get("sliding_attention") or {}
    # Gemma 3: a rope per layer type; Gemma 2: one rope for every layer
    default_theta = getattr(config, "rope_local_base_freq", None) or params.get(
        "rope_theta", getattr(config, "rope_theta", 10000.0)
    )
    local_theta = local.get("rope_theta", default_theta)
    if local.get("rope_type", "default") != "default":
        raise UnsupportedModelError("gemma3_text: local rope scaling is not supported")
    window = getattr(config, "sliding_window", None)
    return {
        "embedding_scale": float(config.hidden_size) ** 0.5,
        "attention_scale": float(config.query_pre_attn_scalar) ** -0.5,
        "sliding_layers": sliding if any(sliding) else (),
        "local_window": int(window) if window and any(sliding) else None,
        "local_rope": RopeSpec(theta=float(local_theta)) if any(sliding) else None,
    }


def _config_scales(config: Any) -> dict[str, Any]:
    """Granite's multipliers, under ModelSpec's names."""
    return {
        "embedding_scale": float(config.embedding_multiplier),
        "residual_scale": float(config.residual_multiplier),
        "attention_scale": float(config.attention_multiplier),
        "logits_divisor": float(config.logits_scaling),
    }


def _as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _rope_spec(config: Any) -> RopeSpec:
    # transformers >= 5 keeps everything in `rope_parameters`; older versions
    # use `rope_theta` plus an optional `rope_scaling` dict.
    params: dict[str, Any] = dict(getattr(config, "rope_parameters", None) or {})
    if "full_attention" in params:  # per layer type (Gemma 3): the global layers' rope
        params = dict(params["full_attention"] or {})
    scaling = getattr(config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    rope_type = "longrope" if rope_type == "su" else rope_type  # Phi-3's older name
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope_type={rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})"
        )
    partial = float(
        params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    )
    original = int(
        params.get("original_max_position_embeddings")
        or getattr(config, "original_max_position_embeddings", None)
        or config.max_position_embeddings
    )
    longrope: dict[str, Any] = {}
    if rope_type == "longrope":
        factor = params.get("factor") or config.max_position_embeddings / original
        attention_factor = params.get("attention_factor")
        if attention_factor is None:  # the LongRoPE paper's choice, as transformers makes it
            attention_factor = (
                1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            )
        longrope = {
            "short_factor": tuple(float(f) for f in params["short_factor"]),
            "long_factor": tuple(float(f) for f in params["long_factor"]),
            "attention_factor": float(attention_factor),
        }
    return RopeSpec(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
        partial_rotary_factor=partial,
        **longrope,
    )


def _sliding_window(config: Any, model_type: str, arch: Architecture) -> int | None:
    if arch.gemma_scales:  # per layer: ModelSpec.local_window
        return None
    if arch.window_needs_flag:
        if getattr(config, "use_sliding_window", False):
            raise UnsupportedModelError(
                f"{model_type} with use_sliding_window=True is not supported"
            )
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None

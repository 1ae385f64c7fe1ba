"""Llama-family decoder over a flat token batch and a paged KV cache.

One forward serves any mix of prefill chunks and decode tokens from many
requests: tokens are concatenated into ``input_ids [num_tokens]`` with their
``positions [num_tokens]``; attention finds each token's sequence, context
and cache blocks through :class:`~streamgen.attention.AttentionMetadata`.

Layer (pre-norm)::

    h = x + o_proj(attn(rope(q), rope(k), v))      q, k, v = split(qkv_proj(rms(x)))
                                                   (Qwen3: q, k = rms per head first)
    y = h + down_proj(silu(gate) * up)              gate, up = split(gate_up_proj(rms(h)))

Submodules are called through ``.forward`` in the step's hot path: no hooks
are used, and skipping ``nn.Module.__call__`` saves ~1.5 ms per decode step
of SmolLM2 (300 calls).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from streamgen.attention.backend import AttentionBackend, AttentionMetadata
from streamgen.model.config import ModelSpec
from streamgen.model.linear import Linear
from streamgen.model.native_decode import NativeDecoder
from streamgen.model.rope import (
    apply_rope,
    rope_angles,
    rope_inv_freq,
    rope_long_inv_freq,
    signed_sin,
)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        # One fused op in every dtype; it accumulates in float32 internally.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def head_norms(
    qk: torch.Tensor, num_heads: int, q_norm: RMSNorm, k_norm: RMSNorm
) -> torch.Tensor:  # qk [num_tokens, num_heads + num_kv_heads, head_dim] -> same
    """Each q head through ``q_norm`` and each k head through ``k_norm`` (Qwen3)."""
    return torch.cat(
        (q_norm.forward(qk[:, :num_heads]), k_norm.forward(qk[:, num_heads:])), dim=1
    )


NORM_ROLE_ORDER = ("attn_in", "attn_out", "mlp_in", "mlp_out")
GATE_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def projection_norms(
    qk: torch.Tensor, q_size: int, q_norm: RMSNorm, k_norm: RMSNorm
) -> torch.Tensor:  # qk [num_tokens, q_size + kv_size] -> same
    """The whole q projection through ``q_norm``, the whole k through ``k_norm`` (OLMo 2)."""
    return torch.cat((q_norm.forward(qk[:, :q_size]), k_norm.forward(qk[:, q_size:])), dim=1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        self.qkv_proj = Linear(spec.hidden_size, spec.q_size + 2 * spec.kv_size, spec.qkv_bias)
        self.o_proj = Linear(spec.q_size, spec.hidden_size)
        self.scale = spec.softmax_scale
        # RMSNorm of q and k before rope (ModelSpec.qk_norm): over each head (Qwen3) or
        # over the whole projection (OLMo 2: qk_norm_whole).
        q_width, k_width = (
            (spec.q_size, spec.kv_size) if spec.qk_norm_whole else (spec.head_dim, spec.head_dim)
        )
        self.q_norm = RMSNorm(q_width, spec.rms_norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(k_width, spec.rms_norm_eps) if spec.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,  # [num_tokens, 1, head_dim]
        sin: torch.Tensor,  # [num_tokens, 1, head_dim], first half negated (rope.signed_sin)
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        spec = self.spec
        num_tokens = x.shape[0]
        qkv = self.qkv_proj.forward(x)  # [num_tokens, q_size + 2 * kv_size]
        # Rotate q and k in one go: [num_tokens, num_heads + num_kv_heads, head_dim].
        qk_size = spec.q_size + spec.kv_size
        qk = qkv[:, :qk_size]
        if self.q_norm is not None and self.k_norm is not None and spec.qk_norm_whole:
            qk = projection_norms(qk, spec.q_size, self.q_norm, self.k_norm)
        qk = qk.reshape(num_tokens, -1, spec.head_dim)
        if self.q_norm is not None and self.k_norm is not None and not spec.qk_norm_whole:
            qk = head_norms(qk, spec.num_heads, self.q_norm, self.k_norm)
        qk = apply_rope(qk, cos, sin)
        q, k = qk[:, : spec.num_heads], qk[:, spec.num_heads :]
        v = qkv[:, qk_size:].view(num_tokens, spec.num_kv_heads, spec.head_dim)
        k_cache, v_cache = kv_cache
        backend.write_kv(k, v, k_cache, v_cache, metadata)
        out = backend.attend(q, k_cache, v_cache, metadata, self.scale)
        return self.o_proj.forward(out.reshape(num_tokens, spec.q_size))


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.intermediate_size = spec.intermediate_size
        self.activation = GATE_ACTIVATIONS[spec.hidden_act]  # SwiGLU or GeGLU
        self.gate_up_proj = Linear(spec.hidden_size, 2 * spec.intermediate_size)
        self.down_proj = Linear(spec.intermediate_size, spec.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        gate, up = self.gate_up_proj.forward(x).split(self.intermediate_size, dim=-1)
        return self.down_proj.forward(self.activation(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = MLP(spec)
        self.residual_scale = spec.residual_scale
        # The layer's norms by role under their HF names (ModelSpec.layer_norm_roles): on
        # the branches' inputs (Llama), outputs (OLMo 2) or both (Gemma 3).
        self.norm_roles = spec.layer_norm_roles
        for name in self.norm_roles.values():
            self.add_module(name, RMSNorm(spec.hidden_size, spec.rms_norm_eps))
        # (attn_in, attn_out, mlp_in, mlp_out), resolved once (a plain tuple: the modules
        # stay registered under their names; loading replaces weights, not modules)
        self._role_norms = tuple(self.norm(role) for role in NORM_ROLE_ORDER)

    def norm(self, role: str) -> RMSNorm | None:
        """The norm of ``role`` (``attn_in``, ``attn_out``, ``mlp_in``, ``mlp_out``)."""
        name = self.norm_roles.get(role)
        return None if name is None else getattr(self, name)

    @property
    def role_norms(self) -> tuple[RMSNorm | None, ...]:
        """The norms of (attn_in, attn_out, mlp_in, mlp_out), None where there is none."""
        return self._role_norms

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        attn_in, attn_out, mlp_in, mlp_out = self._role_norms
        scale = self.residual_scale  # Granite's residual_multiplier (1.0 elsewhere)
        normed = x if attn_in is None else attn_in.forward(x)
        attn = self.self_attn.forward(normed, cos, sin, kv_cache, metadata, backend)
        if attn_out is not None:
            attn = attn_out.forward(attn)
        h = x + attn if scale == 1.0 else x + scale * attn
        mlp = self.mlp.forward(h if mlp_in is None else mlp_in.forward(h))
        if mlp_out is not None:
            mlp = mlp_out.forward(mlp)
        return h + mlp if scale == 1.0 else h + scale * mlp


class LlamaModel(nn.Module):
    """Decoder stack plus LM head. Weights come from :func:`streamgen.model.load_model`."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        # nn.Embedding, or QuantizedEmbedding (model/quantized.py) over packed rows
        self.embed_tokens: nn.Module = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size)
        self.register_buffer(
            "inv_freq", rope_inv_freq(spec.rope, spec.head_dim), persistent=False
        )
        self.long_inv_freq: torch.Tensor | None = rope_long_inv_freq(spec.rope, spec.head_dim)
        self.local_inv_freq: torch.Tensor | None = _local_inv_freq(spec)
        # Set by the loader on CPU where the native kernels build (model/native_decode.py).
        self.native_decoder: NativeDecoder | None = None

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens] int64
        positions: torch.Tensor,  # [num_tokens] int64
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v)
        metadata: AttentionMetadata,
        backend: AttentionBackend,
        num_layers: int | None = None,
    ) -> torch.Tensor:  # [num_tokens, hidden], after the final norm
        """Runs the first ``num_layers`` layers (all by default; fewer for the
        self-speculative drafter), then the final norm.

        A few plain decodes on the CPU run in one native call (``native_decoder``)."""
        native = self.native_decoder
        if native is not None and native.accepts(metadata, input_ids.shape[0], kv_caches):
            count = len(self.layers) if num_layers is None else num_layers
            return native.forward(input_ids, positions, kv_caches, metadata, count)
        if self.spec.attn_logit_softcap is not None:  # Gemma 2, every layer
            metadata = dataclasses.replace(metadata, logit_softcap=self.spec.attn_logit_softcap)
        backend.prepare(metadata)
        cos, sin = self._rope_tables(positions)
        local = self._local_attention(positions, metadata)
        x = self.embed(input_ids).to(self.dtype)
        layers = self.layers if num_layers is None else self.layers[:num_layers]
        for i, (layer, kv_cache) in enumerate(zip(layers, kv_caches, strict=True)):
            if local is not None and self.spec.is_sliding(i):  # Gemma 3's local layers
                local_cos, local_sin, local_metadata = local
                x = layer.forward(x, local_cos, local_sin, kv_cache, local_metadata, backend)
            else:
                x = layer.forward(x, cos, sin, kv_cache, metadata, backend)
        return self.norm.forward(x)

    def _local_attention(
        self, positions: torch.Tensor, metadata: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata] | None:
        """Sliding-window layers (Gemma 3): their rope tables and the step's metadata
        with their window; None for models without such layers."""
        spec = self.spec
        angles = self.local_rope_angles(positions)
        if angles is None or spec.local_window is None:
            return None
        cos, sin = angles
        cos = torch.cat((cos, cos), dim=-1)[:, None, :].to(self.dtype)
        sin = signed_sin(torch.cat((sin, sin), dim=-1)[:, None, :]).to(self.dtype)
        return cos, sin, dataclasses.replace(metadata, sliding_window=spec.local_window)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden]
        """The token embeddings, times the spec's ``embedding_scale`` (Granite)."""
        x = self.embed_tokens(input_ids)
        return x if self.spec.embedding_scale == 1.0 else x * self.spec.embedding_scale

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of activations and the KV cache (float32 for quantized weights)."""
        return self.norm.weight.dtype

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [num_rows, hidden]`` -> logits ``[num_rows, vocab]`` float32 (divided by
        the spec's ``logits_divisor``: Granite)."""
        logits = self.lm_head.forward(hidden).float()
        divisor = self.spec.logits_divisor
        logits = logits if divisor == 1.0 else logits / divisor
        cap = self.spec.final_logit_softcap
        return logits if cap is None else cap * torch.tanh(logits / cap)

    def rope_angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[num_tokens, rotary_dim // 2]`` float32 (model/rope.py)."""
        inv_freq: torch.Tensor = self.inv_freq
        return rope_angles(self.spec.rope, inv_freq, self.long_inv_freq, positions)

    def local_rope_angles(
        self, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The sliding layers' cos, sin ``[num_tokens, rotary_dim // 2]`` float32 (Gemma 3:
        their own rope base), None for models without them."""
        if self.spec.local_rope is None or self.local_inv_freq is None:
            return None
        return rope_angles(self.spec.local_rope, self.local_inv_freq, None, positions)

    def init_rope(self, device: torch.device) -> None:
        """(Re)compute the rope frequencies on ``device`` (after a meta-device build)."""
        rope, head_dim = self.spec.rope, self.spec.head_dim
        self.inv_freq = rope_inv_freq(rope, head_dim).to(device)
        long = rope_long_inv_freq(rope, head_dim)
        self.long_inv_freq = None if long is None else long.to(device)
        local = _local_inv_freq(self.spec)
        self.local_inv_freq = None if local is None else local.to(device)

    def _rope_tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # [num_tokens, 1, rotary_dim], computed in float32 like the reference models.
        cos, sin = self.rope_angles(positions)
        dtype = self.dtype
        cos = torch.cat((cos, cos), dim=-1)[:, None, :]
        sin = torch.cat((sin, sin), dim=-1)[:, None, :]
        return cos.to(dtype), signed_sin(sin).to(dtype)


def _local_inv_freq(spec: ModelSpec) -> torch.Tensor | None:
    """The sliding layers' rope frequencies (Gemma), None for models without them."""
    return None if spec.local_rope is None else rope_inv_freq(spec.local_rope, spec.head_dim)

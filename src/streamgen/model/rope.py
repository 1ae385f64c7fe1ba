"""Rotary position embeddings (HF "rotate_half" layout), with llama3, linear and longrope
scaling and partial rotary."""

from __future__ import annotations

import math

import torch

from streamgen.model.config import RopeSpec


def rotary_dim(rope: RopeSpec, head_dim: int) -> int:
    """How many of each head's dims are rotated (the rest pass through: partial rotary)."""
    return int(head_dim * rope.partial_rotary_factor)


def rope_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor:
    """Inverse frequencies, ``[rotary_dim // 2]`` float32 (longrope: the short factors,
    for positions before the original context length)."""
    dim = rotary_dim(rope, head_dim)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    if rope.rope_type == "longrope":
        return inv_freq / torch.tensor(rope.short_factor, dtype=torch.float32)
    return inv_freq


def rope_long_inv_freq(rope: RopeSpec, head_dim: int) -> torch.Tensor | None:
    """longrope: the inverse frequencies of positions from the original context length on
    (the long factors); None for the other rope types."""
    if rope.rope_type != "longrope":
        return None
    dim = rotary_dim(rope, head_dim)
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    return 1.0 / (torch.tensor(rope.long_factor, dtype=torch.float32) * rope.theta**exponents)


def rope_angles(
    rope: RopeSpec,
    inv_freq: torch.Tensor,  # [rotary_dim // 2]
    long_inv_freq: torch.Tensor | None,
    positions: torch.Tensor,  # [num_tokens]
) -> tuple[torch.Tensor, torch.Tensor]:  # cos, sin [num_tokens, rotary_dim // 2] float32
    """cos and sin of every position's angles, float32.

    longrope picks the frequencies by position: the short factors before the original
    context length, the long ones from it on (as vLLM does: a cached key keeps the
    rotation it was written with, where transformers re-rotates the whole sequence once
    it grows past that length), and scales both by its attention factor."""
    pos = positions.to(torch.float32)[:, None]
    angles = pos * inv_freq[None, :]
    if long_inv_freq is not None:
        far = (positions >= rope.original_max_position_embeddings)[:, None]
        angles = torch.where(far, pos * long_inv_freq[None, :], angles)
    cos, sin = angles.cos(), angles.sin()
    if rope.attention_factor != 1.0:
        cos, sin = cos * rope.attention_factor, sin * rope.attention_factor
    return cos, sin


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, and the band
    # between is interpolated smoothly.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[num_tokens, num_heads, head_dim]`` by per-token ``cos`` and
    ``signed_sin`` ``[num_tokens, 1, head_dim]`` (see :func:`signed_sin`).

    HF's "rotate_half" form, ``x * cos + cat(-x2, x1) * sin``, with the sign
    folded into the table so that the step costs three kernels. Tables narrower than
    the head (partial rotary) rotate its first dims and pass the rest through.
    """
    width = cos.shape[-1]
    if width < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :width], cos, signed_sin), x[..., width:]), dim=-1)
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return torch.addcmul(x * cos, swapped, signed_sin)


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``[..., head_dim]`` sin table -> the same with its first half negated."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

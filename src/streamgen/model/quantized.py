"""Modules over quantized weights (:class:`~streamgen.native.qkernels.PackedWeight`).

A quantized layer keeps only the packed bytes (about the GGUF file's size); the int8
kernels read them directly for every step, from one decode row to a prefill chunk
(each unpacked weight block serves a tile of rows), so nothing is ever dequantized
into a resident float copy.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from streamgen.native.qkernels import PackedWeight, QContextStruct, QuantContext, QWeightStruct


class QParts(ctypes.Structure):
    """``sg_qparts`` (quant_layout.h): a fused layer's row blocks."""

    _fields_ = [
        ("parts", ctypes.POINTER(QWeightStruct)),
        ("count", ctypes.c_int64),
        ("ctx", ctypes.POINTER(QContextStruct)),
        ("out_features", ctypes.c_int64),
        ("residual", ctypes.c_int32),
        ("_pad", ctypes.c_int32),
    ]


class PackedLinear:
    """The packed parts of one linear layer and the C struct that names them.

    The struct holds raw addresses: this object keeps the tensors and structs alive.
    ``residual_activations``: quantize inputs to ~16 bits (two int8 roundings, see
    ``sg_qparts`` in quant_layout.h), for the LM head.
    """

    def __init__(
        self,
        parts: tuple[PackedWeight, ...],
        ctx: QuantContext,
        *,
        residual_activations: bool = False,
    ) -> None:
        self.parts = parts
        self.residual_activations = residual_activations
        self.ctx = ctx
        self.out_features = sum(p.out_features for p in parts)
        self.in_features = parts[0].in_features
        self._array = (QWeightStruct * len(parts))(*(p.struct() for p in parts))
        self._ctx_struct = ctx.struct
        self.struct = QParts(
            self._array,
            len(parts),
            ctypes.pointer(self._ctx_struct),
            self.out_features,
            int(residual_activations),
            0,
        )

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [m, in] f32 -> [m, out] f32
        return self.ctx.linear_parts(self.struct, x, self.out_features)

    def dequantize(self) -> torch.Tensor:  # [out, in] f32: the layer's weight values, exactly
        return torch.cat([self.ctx.dequantize(p) for p in self.parts])


class QuantizedEmbedding(nn.Module):
    """Token embeddings kept packed; looked-up rows are dequantized (float32)."""

    def __init__(self, weight: PackedWeight, ctx: QuantContext) -> None:
        super().__init__()
        self.packed = weight
        self.ctx = ctx
        self.num_embeddings = weight.out_features
        self.embedding_dim = weight.in_features

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [n] -> [n, hidden] f32
        return self.ctx.dequantize(self.packed, input_ids.reshape(-1)).reshape(
            *input_ids.shape, self.embedding_dim
        )


def kernel_context(model: nn.Module) -> QuantContext | None:
    """The kernel context (ISA and worker pool) that a quantized model's packed layers
    (and its packed embedding) share, made once at load; None for a dense model."""
    for module in model.modules():
        packed = getattr(module, "packed", None)
        if isinstance(packed, PackedLinear):
            return packed.ctx
    return None

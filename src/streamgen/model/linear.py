"""A linear layer whose weight layout is chosen for the device's matmul kernels.

At decode time a linear layer is a matrix-vector product that streams its
weight from memory once per step, so the weight's layout decides how close
the step gets to memory bandwidth. Measured on this project's 2-core AVX2
CPUs (fp32, cold cache, batch 1, GB/s streamed; /tmp-free numbers in
bench/RESULTS.md):

    layer [out, in]     F.linear(x, W)   x @ W_t   bmm over 2 column halves
    qkv   [960, 576]         9.4           12.2           12.8
    gate_up [3072, 576]     10.7           16.9           22.8
    down  [576, 1536]       12.3           11.1           13.3
    lm_head [49152, 576]     9.6           19.9           25.7

A plain GEMV uses one core; splitting the output columns into one slab per
thread and running them as a batched matmul (torch parallelises ``bmm`` over
the batch) uses both. The column-split layout ``[splits, in, out / splits]``
is used for float32 on the CPU where ``out > in``; elsewhere (narrow layers,
half precision — where transposed layouts were 5-15x slower — and GPUs) the
usual ``[out, in]`` layout stays.

Without native bf16/fp16 matmul units (AVX2), a half-precision matmul with
many rows runs at vector speed, not GEMM speed: 100 rows x [3072, 576] take
21.6 ms in bf16 and 4.4 ms when both operands are upcast to fp32 first. Such
layers compute multi-row inputs (prefill) in fp32 and round the result back;
:func:`upcast_min_rows` decides from how many rows.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from streamgen.model.quantized import PackedLinear
from streamgen.native.kernels import (
    MAX_NATIVE_ROWS,
    QUANT_DTYPE_CODE,
    NativeKernels,
    NativeLinear,
    dtype_code,
    native_linear,
)


def column_splits(
    out_features: int, in_features: int, dtype: torch.dtype, device: torch.device, threads: int
) -> int | None:
    """Number of column slabs for the split layout, or None for ``[out, in]``."""
    if device.type != "cpu" or dtype != torch.float32 or out_features <= in_features:
        return None
    splits = max(1, threads)
    while out_features % splits:
        splits -= 1
    return splits


def upcast_min_rows(dtype: torch.dtype, device: torch.device) -> int | None:
    """Row count from which a half-precision CPU matmul is faster in fp32 (None: never)."""
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        return 8
    return None


class Linear(nn.Module):
    """``y = x W^T + b``, with ``W`` stored as ``[out, in]`` or as column slabs
    ``[splits, in, out / splits]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        )
        self.splits: int | None = None
        self.upcast_min_rows: int | None = None
        self.native: tuple[NativeKernels, NativeLinear] | None = None
        self.packed: PackedLinear | None = None

    def set_packed(self, packed: PackedLinear, kernels: NativeKernels | None) -> None:
        """Serve this layer from quantized weights: the int8 kernels read the packed bytes
        for any number of rows (at prefill sizes they also beat dequantize + fp32 GEMM), so
        a row's result never depends on how many rows share its step."""
        if (packed.out_features, packed.in_features) != (self.out_features, self.in_features):
            raise ValueError(
                f"packed weight {packed.out_features}x{packed.in_features} for a "
                f"{self.out_features}x{self.in_features} layer"
            )
        self.packed = packed
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.bias = None
        self.splits = None
        self.upcast_min_rows = None
        self.native = None
        if kernels is not None:
            struct = NativeLinear(
                ctypes.addressof(packed.struct), None, QUANT_DTYPE_CODE, 0,
                self.out_features, self.in_features,
            )
            self.native = (kernels, struct)

    def set_weight(
        self, weight: torch.Tensor, splits: int | None, upcast_min_rows: int | None = None
    ) -> None:
        """Install ``weight [out, in]`` in the layout given by ``splits``."""
        self.splits = splits
        self.upcast_min_rows = upcast_min_rows
        if splits is not None:
            # [out, in] -> [splits, out / splits, in] -> [splits, in, out / splits]
            weight = weight.view(splits, -1, self.in_features).transpose(1, 2).contiguous()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.native = None

    def enable_native(self, kernels: NativeKernels | None) -> None:
        """Compute products of up to ``MAX_NATIVE_ROWS`` rows with the native kernel
        (``[out, in]`` float32 / bf16 weights on the CPU): one core streams the weight
        at memory speed, where torch's one-thread GEMV did not (bf16: ~8 GB/s)."""
        weight = self.weight
        if self.packed is not None:
            return  # set_packed chose
        if kernels is None:
            self.native = None
            return
        usable = (
            self.splits is None
            and dtype_code(weight.dtype) is not None
            and weight.device.type == "cpu"
            and weight.is_contiguous()
        )
        self.native = (kernels, native_linear(weight, self.bias)) if usable else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        packed = self.packed
        if packed is not None:  # every row count: the same arithmetic alone or batched
            return packed.forward(x).to(x.dtype)
        native = self.native
        if native is not None and x.shape[0] <= MAX_NATIVE_ROWS:
            kernels, struct = native
            y = torch.empty(x.shape[0], self.out_features)
            kernels.linear(struct, x.float().contiguous(), y)
            return y.to(x.dtype)
        if self.upcast_min_rows is not None and x.shape[0] >= self.upcast_min_rows:
            bias = None if self.bias is None else self.bias.float()
            return self._matmul(x.float(), self.weight.float(), bias).to(x.dtype)
        return self._matmul(x, self.weight, self.bias)

    def _matmul(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        if self.splits is None:
            return F.linear(x, weight, bias)
        if self.splits == 1:
            y = x @ weight[0]
        else:
            num_tokens = x.shape[0]
            slabs = torch.bmm(x.expand(self.splits, num_tokens, self.in_features), weight)
            y = slabs.transpose(0, 1).reshape(num_tokens, self.out_features)
        return y if bias is None else y + bias

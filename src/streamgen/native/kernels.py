"""ctypes view of ``decode_kernels.c``: its structs, entry points and torch glue.

Every pointer handed to C comes from a contiguous CPU tensor that the caller
keeps alive for the duration of the call (the structs hold raw addresses).
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from streamgen.native.build import NativeUnavailableError, load_library

logger = logging.getLogger(__name__)

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# KV caches may also hold float16 (SG_F16): a quantized model's default (runner/kv_cache.py).
_KV_DTYPE_CODES = {**_DTYPE_CODES, torch.float16: 3}
QUANT_DTYPE_CODE = 2  # SG_QUANT: the linear's weight is an sg_qparts (model/quantized.py)

# Rows per step up to which the native kernels beat torch's matmuls (see native_decode.py).
MAX_NATIVE_ROWS = 32
_ERRORS = {-1: "out of memory", -2: "invalid arguments"}


class NativeLinear(ctypes.Structure):
    _fields_ = [
        ("weight", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("dtype", ctypes.c_int32),
        ("splits", ctypes.c_int32),
        ("out_features", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
    ]


class NativeLayer(ctypes.Structure):
    _fields_ = [
        ("qkv", NativeLinear),
        ("o", NativeLinear),
        ("gate_up", NativeLinear),
        ("down", NativeLinear),
        # by role: attention input, attention output, MLP input, MLP output (None: none)
        ("norms", ctypes.c_void_p * 4),
        ("k_cache", ctypes.c_void_p),
        ("v_cache", ctypes.c_void_p),
        ("q_norm", ctypes.c_void_p),  # None: no per-head q norm (Qwen3 has one)
        ("k_norm", ctypes.c_void_p),
        ("window", ctypes.c_int64),  # this layer's sliding window (0: none)
        ("local_rope", ctypes.c_int32),  # 1: the step's local rope tables (Gemma 3)
        ("_pad", ctypes.c_int32),
    ]


class NativeModel(ctypes.Structure):
    _fields_ = [
        ("hidden", ctypes.c_int64),
        ("q_size", ctypes.c_int64),
        ("kv_size", ctypes.c_int64),
        ("intermediate", ctypes.c_int64),
        ("num_heads", ctypes.c_int64),
        ("num_kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("block_size", ctypes.c_int64),
        ("window", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("dtype", ctypes.c_int32),
        ("residual_scale", ctypes.c_float),
        ("qctx", ctypes.c_void_p),  # a quantized model's sg_qctx (its worker pool), or None
        ("activation", ctypes.c_int32),  # the gate's: ACTIVATION_CODES
        ("qk_norm_whole", ctypes.c_int32),  # 1: q / k norms over the whole projection
        ("rotary_dim", ctypes.c_int64),  # rotated dims per head (< head_dim: partial rotary)
        # 1: quantized layers' inputs quantized as the norm / SwiGLU make them (fused); 0:
        # quantize the finished rows (the same values, for tests)
        ("fuse_inputs", ctypes.c_int32),
        ("attention_kernels", ctypes.c_int32),  # attention's inner loops: attention_table()
        ("attn_softcap", ctypes.c_float),  # > 0: scores soft-capped (Gemma 2); 0: none
        ("kv_dtype", ctypes.c_int32),  # the KV cache's elements: kv_dtype_code()
    ]


# The gated MLP's activation (ModelSpec.hidden_act) -> sg_model.activation.
ACTIVATION_CODES = {"silu": 0, "gelu_tanh": 1}


def dtype_code(dtype: torch.dtype) -> int | None:
    """The kernels' code for a tensor dtype, or None where they have no kernel for it."""
    return _DTYPE_CODES.get(dtype)


def kv_dtype_code(dtype: torch.dtype) -> int | None:
    """The kernels' code for a KV cache's dtype (float32, bfloat16, float16), or None."""
    return _KV_DTYPE_CODES.get(dtype)


def ptr(tensor: torch.Tensor | None) -> int | None:
    """Address of a contiguous CPU tensor's data (None for None)."""
    if tensor is None:
        return None
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("native kernels take contiguous CPU tensors")
    return int(tensor.data_ptr())


def native_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> NativeLinear:
    """The struct of a linear layer's ``weight [out, in]`` and ``bias [out]``."""
    code = dtype_code(weight.dtype)
    if code is None or weight.dim() != 2:
        raise ValueError(f"no native linear kernel for a {weight.dtype} weight of {weight.shape}")
    out_features, in_features = weight.shape
    return NativeLinear(ptr(weight), ptr(bias), code, 0, out_features, in_features)


class NativeKernels:
    """The loaded library's entry points, typed.

    >>> kernels = native_kernels()  # None where they cannot be built  # doctest: +SKIP
    >>> kernels.linear(struct, x, y)  # y [m, out] f32 = x [m, in] f32 @ W^T + b
    """

    def __init__(self, library: ctypes.CDLL) -> None:
        i64, f32, vp = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
        self._linear = library.sg_linear_forward
        self._linear.argtypes = [ctypes.POINTER(NativeLinear), vp, vp, i64]
        self._rms_norm = library.sg_rms_norm
        self._rms_norm.argtypes = [vp, vp, ctypes.c_int32, vp, i64, i64, f32]
        self._forward_layers = library.sg_forward_layers
        self._forward_layers.argtypes = [
            ctypes.POINTER(NativeModel), ctypes.POINTER(NativeLayer), i64, vp, i64,
            vp, vp, vp, vp, vp, i64, vp, vp, vp, i64, vp, i64, vp, vp,
        ]
        self._paged_attention = library.sg_paged_attention
        self._paged_attention.argtypes = [
            ctypes.POINTER(NativeModel), vp, vp, vp, i64, i64, vp, vp, vp, i64, vp, i64, vp,
        ]
        for fn in (self._linear, self._rms_norm, self._forward_layers, self._paged_attention):
            fn.restype = ctypes.c_int
        self.simd = bool(library.sg_simd_level())

    def linear(self, lin: NativeLinear, x: torch.Tensor, out: torch.Tensor) -> None:
        """``out [m, out_features]`` f32 = ``x [m, in_features]`` f32 @ W^T (+ bias)."""
        _check(self._linear(ctypes.byref(lin), ptr(x), ptr(out), x.shape[0]))

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``x [m, n]`` f32 -> RMS-normalised rows times ``weight [n]`` (f32 or bf16)."""
        code = dtype_code(weight.dtype)
        if code is None:
            raise ValueError(f"no native rms_norm for {weight.dtype}")
        out = torch.empty_like(x)
        _check(self._rms_norm(ptr(x), ptr(weight), code, ptr(out), x.shape[0], x.shape[1], eps))
        return out

    def forward_layers(
        self,
        model: NativeModel,
        layers: ctypes.Array[NativeLayer],
        num_layers: int,
        x: torch.Tensor,  # [m, hidden] f32, updated in place (the residual stream)
        cos: torch.Tensor,  # [m, rotary_dim / 2] f32
        sin: torch.Tensor,  # [m, rotary_dim / 2] f32
        local: tuple[torch.Tensor, torch.Tensor] | None,  # the local layers' cos, sin
        slots: torch.Tensor,  # [m] int64
        query_start: torch.Tensor,  # [num_seqs + 1] int64
        seq_lens: torch.Tensor,  # [num_seqs] int64
        block_tables: torch.Tensor,  # [num_seqs, stride] int64
        tree_mask: torch.Tensor | None,  # [m, tree_stride] bool / uint8; None: causal
        final_norm: torch.Tensor,  # [hidden]
        out: torch.Tensor,  # [m, hidden] f32
    ) -> None:
        """``sg_forward_layers``: every layer and the final norm over a small step."""
        _check(self._forward_layers(
            ctypes.byref(model), layers, num_layers, ptr(x), x.shape[0], ptr(cos), ptr(sin),
            None if local is None else ptr(local[0]), None if local is None else ptr(local[1]),
            ptr(slots), seq_lens.shape[0], ptr(query_start), ptr(seq_lens), ptr(block_tables),
            block_tables.shape[1], ptr(tree_mask), 0 if tree_mask is None else tree_mask.shape[1],
            ptr(final_norm), ptr(out),
        ))

    def paged_attention(
        self,
        model: NativeModel,  # heads, head_dim, block_size, window, scale and dtype are read
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        query: torch.Tensor,  # [m, num_heads * head_dim] f32, rotated
        query_start: torch.Tensor,  # [num_seqs + 1] int64
        seq_lens: torch.Tensor,  # [num_seqs] int64
        block_tables: torch.Tensor,  # [num_seqs, stride] int64
        tree_mask: torch.Tensor | None,  # [m, tree_stride] bool / uint8; None: causal
        out: torch.Tensor,  # [m, num_heads * head_dim] f32
    ) -> None:
        """``sg_paged_attention``: attention over the paged cache, read in place."""
        _check(self._paged_attention(
            ctypes.byref(model), ptr(k_cache), ptr(v_cache), ptr(query), query.shape[0],
            seq_lens.shape[0], ptr(query_start), ptr(seq_lens), ptr(block_tables),
            block_tables.shape[1], ptr(tree_mask), 0 if tree_mask is None else tree_mask.shape[1],
            ptr(out),
        ))


def _check(code: int) -> None:
    if code != 0:
        raise RuntimeError(f"native kernel failed: {_ERRORS.get(code, code)}")


@functools.cache
def native_kernels() -> NativeKernels | None:
    """The native kernels, or None (with one logged reason) where they cannot be used.

    Built on first use (a second or so with gcc) and cached for the process.
    """
    try:
        return NativeKernels(load_library())
    except NativeUnavailableError as exc:
        logger.warning("native CPU kernels unavailable, decoding through torch: %s", exc)
        return None

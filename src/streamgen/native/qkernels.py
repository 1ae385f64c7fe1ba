"""ctypes view of the quantized compute core (``qgemm.c``, ``thread_pool.c``).

:class:`PackedWeight` is a quantized weight as every kernel takes it: the packed bytes
(``quant_layout.h``), its type and its shape. :class:`QuantContext` is the ISA the
kernels run with and the thread pool they split each matmul across; it is made once
per model (no global state) and freed with it.

>>> ctx = QuantContext.create(threads=2)  # doctest: +SKIP
>>> y = ctx.linear(weight, x)  # x [m, in] f32 -> y [m, out] f32  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import os
from dataclasses import dataclass

import numpy as np
import torch

from streamgen.errors import ConfigError
from streamgen.native.build import NativeUnavailableError, load_library

ISA_ENV_VAR = "STREAMGEN_NATIVE_ISA"
GROUP_ROWS = 16


class Isa(enum.IntEnum):
    """``enum sg_isa``: the kernel variants, slowest first."""

    SCALAR = 0
    AVX2 = 1
    AVXVNNI = 2
    AVX512VNNI = 3


class QWeightStruct(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("type", ctypes.c_int32),
        ("_pad", ctypes.c_int32),
        ("out_features", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
    ]


class QActStruct(ctypes.Structure):
    _fields_ = [
        ("q", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("s16", ctypes.c_void_p),
        ("ds", ctypes.c_void_p),
        ("m", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("pairs", ctypes.c_int64),
    ]


class QContextStruct(ctypes.Structure):
    _fields_ = [("pool", ctypes.c_void_p), ("isa", ctypes.c_int32), ("_pad", ctypes.c_int32)]


@dataclass(frozen=True, eq=False)
class PackedWeight:
    """A quantized ``[out_features, in_features]`` weight in the kernels' layout.

    ``data`` is the packed bytes of ``padded_out`` rows (a multiple of 16; padded
    rows are zeros); ``qtype`` is a :class:`~streamgen.checkpoint.gguf_quants.QuantType`
    value. ``bias`` (f32 ``[padded_out]``) is added by every kernel that uses it.
    """

    data: torch.Tensor  # [num bytes] uint8
    qtype: int
    out_features: int
    in_features: int
    bias: torch.Tensor | None = None  # [padded_out] f32

    @property
    def padded_out(self) -> int:
        return -(-self.out_features // GROUP_ROWS) * GROUP_ROWS

    @property
    def nbytes(self) -> int:
        return int(self.data.numel()) + (0 if self.bias is None else int(self.bias.numel()) * 4)

    def struct(self) -> QWeightStruct:
        bias = None if self.bias is None else int(self.bias.data_ptr())
        return QWeightStruct(
            int(self.data.data_ptr()), bias, self.qtype, 0, self.padded_out, self.in_features
        )

    def with_bias(self, bias: torch.Tensor | None) -> PackedWeight:
        if bias is None:
            return self
        padded = torch.zeros(self.padded_out, dtype=torch.float32)
        padded[: self.out_features] = bias.float()
        return PackedWeight(self.data, self.qtype, self.out_features, self.in_features, padded)


class _Library:
    def __init__(self, lib: ctypes.CDLL) -> None:
        vp, i32, i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64
        self.isa_supported = lib.sg_isa_supported
        self.isa_supported.argtypes, self.isa_supported.restype = [i32], ctypes.c_int
        self.pool_create = lib.sg_qpool_create
        self.pool_create.argtypes, self.pool_create.restype = [i32], vp
        self.pool_destroy = lib.sg_qpool_destroy
        self.pool_destroy.argtypes, self.pool_destroy.restype = [vp], None
        self.quantize_act = lib.sg_quantize_act_ctx
        self.quantize_act.argtypes = [
            ctypes.POINTER(QContextStruct),
            vp,
            i64,
            i64,
            ctypes.POINTER(QActStruct),
        ]
        self.qgemm = lib.sg_qgemm
        self.qgemm.argtypes = [
            ctypes.POINTER(QContextStruct),
            ctypes.POINTER(QWeightStruct),
            ctypes.POINTER(QActStruct),
            vp,
        ]
        self.qlinear = lib.sg_qlinear
        self.qlinear.argtypes = [
            ctypes.POINTER(QContextStruct),
            ctypes.POINTER(QWeightStruct),
            vp,
            i64,
            vp,
        ]
        self.dequantize_rows = lib.sg_qdequantize_rows
        self.dequantize_rows.argtypes = [
            ctypes.POINTER(QContextStruct),
            ctypes.POINTER(QWeightStruct),
            vp,
            i64,
            vp,
        ]
        self.qlinear_parts = lib.sg_qlinear_parts
        self.qlinear_parts.argtypes = [vp, vp, i64, vp, i64]
        self.quantize_q4_k = lib.sg_quantize_q4_k
        self.quantize_q4_k.argtypes = [vp, vp, i64, i64, vp]
        for fn in (
            self.quantize_q4_k,
            self.quantize_act,
            self.qgemm,
            self.qlinear,
            self.dequantize_rows,
            self.qlinear_parts,
        ):
            fn.restype = ctypes.c_int


def _library() -> _Library:
    return _Library(load_library())


def supported_isas() -> list[Isa]:
    """The variants this CPU runs (always at least the scalar one)."""
    lib = _library()
    return [isa for isa in Isa if lib.isa_supported(int(isa))]


def select_isa() -> Isa:
    """``STREAMGEN_NATIVE_ISA`` where set (it must be supported here), else the fastest."""
    forced = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    available = supported_isas()
    if not forced:
        return available[-1]
    names = {isa.name.lower(): isa for isa in Isa}
    if forced not in names:
        raise ConfigError(f"{ISA_ENV_VAR}={forced!r}: use one of {sorted(names)}")
    if names[forced] not in available:
        raise ConfigError(
            f"{ISA_ENV_VAR}={forced!r}: this CPU supports only "
            f"{[isa.name.lower() for isa in available]}"
        )
    return names[forced]


# sg_model.attention_kernels (enum sg_attend_table) per ISA: attention's inner loops are
# the build's own (AVX2 + FMA, or scalar) except on AVX-512, which has its own loops with
# the AVX2 loops' bits.
ATTENTION_TABLES = {Isa.SCALAR: 0, Isa.AVX2: 0, Isa.AVXVNNI: 0, Isa.AVX512VNNI: 1}


def attention_table(isa: Isa | None = None) -> int:
    """The attention kernels' table for ``isa`` (default: :func:`select_isa`): the faster
    loops the CPU runs, or the ones ``STREAMGEN_NATIVE_ISA`` asks for (tests)."""
    return ATTENTION_TABLES[select_isa() if isa is None else isa]


def default_threads() -> int:
    """The CPUs this process may run on (``sched_getaffinity``)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _check(code: int, what: str) -> None:
    if code != 0:
        reason = {-1: "out of memory", -2: "invalid arguments"}.get(code, str(code))
        raise RuntimeError(f"native {what} failed: {reason}")


class QuantContext:
    """The ISA and the worker pool of the quantized kernels (one per model)."""

    def __init__(self, lib: _Library, isa: Isa, threads: int) -> None:
        self._lib = lib
        self.isa = isa
        self.threads = threads
        self._pool = self._start_pool(threads)
        self._struct = QContextStruct(self._pool, int(isa), 0)

    @classmethod
    def create(cls, *, isa: Isa | None = None, threads: int | None = None) -> QuantContext:
        """A context for ``isa`` (default: :func:`select_isa`) and ``threads`` workers
        (default: every CPU this process may use)."""
        lib = _library()
        chosen = select_isa() if isa is None else isa
        if not lib.isa_supported(int(chosen)):
            raise ConfigError(f"ISA {chosen.name.lower()} is not supported by this CPU")
        return cls(lib, chosen, default_threads() if threads is None else threads)

    def resize(self, threads: int) -> None:
        """Runs the kernels on ``threads`` workers from now on (a new pool; the struct the
        packed layers point to is updated in place). Only while no kernel runs."""
        if threads == self.threads:
            return
        old, self._pool = self._pool, self._start_pool(threads)
        self._struct.pool = self._pool
        self.threads = threads
        if old:
            self._lib.pool_destroy(old)

    def _start_pool(self, threads: int) -> int | None:
        """A worker pool of ``threads`` (None for one: the caller runs every task)."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ConfigError(f"threads={threads!r}: must be an int >= 1")
        pool = self._lib.pool_create(threads) if threads > 1 else None
        if threads > 1 and not pool:
            raise NativeUnavailableError(f"cannot start {threads} native worker threads")
        return pool

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool:
            self._lib.pool_destroy(pool)
        self._struct = QContextStruct(None, int(self.isa), 0)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()

    @property
    def struct(self) -> QContextStruct:
        return self._struct

    def linear(self, weight: PackedWeight, x: torch.Tensor) -> torch.Tensor:
        """``x [m, in]`` f32 @ W^T (+ bias) -> ``[m, out]`` f32."""
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], weight.padded_out, dtype=torch.float32)
        ws = weight.struct()
        _check(
            self._lib.qlinear(
                ctypes.byref(self._struct), ctypes.byref(ws), x.data_ptr(), x.shape[0], y.data_ptr()
            ),
            "quantized linear",
        )
        return y if weight.padded_out == weight.out_features else y[:, : weight.out_features]

    def linear_parts(
        self, parts: ctypes.Structure, x: torch.Tensor, out_features: int
    ) -> torch.Tensor:
        """``sg_qlinear_parts``: ``x [m, in]`` f32 through a fused layer's parts (an
        ``sg_qparts`` struct, model/quantized.py) -> ``[m, out_features]`` f32."""
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], out_features, dtype=torch.float32)
        _check(
            self._lib.qlinear_parts(
                ctypes.byref(parts), x.data_ptr(), x.shape[0], y.data_ptr(), out_features
            ),
            "quantized linear",
        )
        return y

    def quantize_activations(
        self, x: torch.Tensor
    ) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor
    ]:  # q [m, in] i8, d [m, in/32], s16 [m, in/16]
        x = x.float().contiguous()
        m, n = x.shape
        q = torch.empty(m, n, dtype=torch.int8)
        d = torch.empty(m, n // 32, dtype=torch.float32)
        s16 = torch.empty(m, n // 16, dtype=torch.int32)
        ds = torch.empty(m, n // 32, dtype=torch.float32)
        act = QActStruct(q.data_ptr(), d.data_ptr(), s16.data_ptr(), ds.data_ptr(), m, n, 0)
        _check(
            self._lib.quantize_act(
                ctypes.byref(self._struct), x.data_ptr(), m, n, ctypes.byref(act)
            ),
            "quantize",
        )
        return q, d, s16

    def gemm(
        self, weight: PackedWeight, q: torch.Tensor, d: torch.Tensor, s16: torch.Tensor
    ) -> torch.Tensor:
        """The matmul over activations already quantized (``quantize_activations``)."""
        m, n = q.shape
        y = torch.empty(m, weight.padded_out, dtype=torch.float32)
        # the mins' term d * (block sum of q), as the quantizer computes it (one fp32 product)
        ds = (d * s16.view(m, -1, 2).sum(-1).float()).contiguous()
        act = QActStruct(q.data_ptr(), d.data_ptr(), s16.data_ptr(), ds.data_ptr(), m, n, 0)
        ws = weight.struct()
        _check(
            self._lib.qgemm(
                ctypes.byref(self._struct), ctypes.byref(ws), ctypes.byref(act), y.data_ptr()
            ),
            "quantized gemm",
        )
        return y[:, : weight.out_features]

    def quantize_q4_k(self, values: np.ndarray) -> np.ndarray:  # [out, in / 256 * 144] u8
        """GGUF Q4_K bytes of ``values [out, in]`` (``in`` a multiple of 256), rounded as
        llama.cpp's reference quantizer rounds (``native/kquant.c``)."""
        x = np.ascontiguousarray(values, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] % 256:
            raise ValueError(f"Q4_K needs rows of a multiple of 256 values, not {x.shape}")
        out = np.empty((x.shape[0], x.shape[1] // 256 * 144), dtype=np.uint8)
        _check(
            self._lib.quantize_q4_k(
                self._pool, x.ctypes.data, x.shape[0], x.shape[1], out.ctypes.data
            ),
            "Q4_K quantization",
        )
        return out

    def dequantize(
        self, weight: PackedWeight, rows: torch.Tensor | None = None
    ) -> torch.Tensor:  # [len(rows) or out, in] f32
        """Rows of the weight (all of them by default) as float32, exactly."""
        ws = weight.struct()
        if rows is None:
            out = torch.empty(weight.out_features, weight.in_features, dtype=torch.float32)
            code = self._lib.dequantize_rows(
                ctypes.byref(self._struct),
                ctypes.byref(ws),
                None,
                weight.out_features,
                out.data_ptr(),
            )
        else:
            ids = rows.to(torch.int64).contiguous()
            # On host ints: a decode's lookup of one id pays no torch reductions for it
            # (the C side checks against the padded rows only).
            values = ids.reshape(-1).tolist()
            if values and (min(values) < 0 or max(values) >= weight.out_features):
                raise IndexError(f"row ids outside [0, {weight.out_features})")
            out = torch.empty(ids.numel(), weight.in_features, dtype=torch.float32)
            code = self._lib.dequantize_rows(
                ctypes.byref(self._struct),
                ctypes.byref(ws),
                ids.data_ptr(),
                ids.numel(),
                out.data_ptr(),
            )
        _check(code, "dequantize")
        return out

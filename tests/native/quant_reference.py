"""numpy references for the quantized kernels: the same arithmetic, in exact integers and
float64, and random canonical tensors of every type."""

from __future__ import annotations

import numpy as np

from streamgen.checkpoint.gguf_quants import FORMATS, QBLOCK, QuantType, Unpacked


def random_unpacked(
    qtype: QuantType, out: int, n: int, rng: np.random.Generator, *, unit_scales: bool = False
) -> Unpacked:
    """Random quants and scales of ``qtype`` (``unit_scales``: every scale 1, no min)."""
    fmt = FORMATS[qtype]
    q = rng.integers(0, 2**fmt.bits, size=(out, n), dtype=np.uint8)
    blocks = n // QBLOCK
    if fmt.k_type:
        supers = n // 256
        d = (
            np.ones((out, supers), np.float32)
            if unit_scales
            else (rng.uniform(0.001, 0.02, (out, supers)).astype(np.float16).astype(np.float32))
        )
        if qtype == QuantType.Q6_K:
            sc = (
                np.ones((out, n // 16), np.int8)
                if unit_scales
                else rng.integers(-128, 128, (out, n // 16)).astype(np.int8)
            )
            return Unpacked(qtype, q, sc, None, d)
        sc = (
            np.ones((out, blocks), np.uint8)
            if unit_scales
            else rng.integers(0, 64, (out, blocks)).astype(np.uint8)
        )
        mn = (
            np.zeros((out, blocks), np.uint8)
            if unit_scales
            else rng.integers(0, 64, (out, blocks)).astype(np.uint8)
        )
        dmin = rng.uniform(0.001, 0.02, (out, supers)).astype(np.float16).astype(np.float32)
        return Unpacked(qtype, q, sc, mn, d, dmin)
    scale = (
        np.ones((out, blocks), np.float16)
        if unit_scales
        else rng.uniform(0.001, 0.05, (out, blocks)).astype(np.float16)
    )
    mn = None
    if fmt.has_min:
        mn = (
            np.zeros((out, blocks), np.float16)
            if unit_scales
            else rng.uniform(-0.5, 0.5, (out, blocks)).astype(np.float16)
        )
    return Unpacked(qtype, q, scale, mn)


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x [m, n] f32 -> (q [m, n] int8, d [m, n / 32] f32): d = max|x| / 127 per 32,
    q = round-half-even(x * (1 / d)), all in float32 as the C code computes it."""
    m, n = x.shape
    xb = x.reshape(m, n // QBLOCK, QBLOCK).astype(np.float32)
    d = (np.abs(xb).max(axis=2) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.clip(np.rint(xb * inv[:, :, None]), -127, 127).astype(np.int8)
    return q.reshape(m, n), d


def reference_gemm(u: Unpacked, qa: np.ndarray, da: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y, bound) for activations (qa, da) times ``u``: y in float64 from exact integer
    block sums; bound = sum over terms of |term| (the fp32 error is a few eps of it)."""
    fmt = FORMATS[u.qtype]
    out, n = u.q.shape
    m = qa.shape[0]
    sub = fmt.sub
    subs = n // sub
    qw = u.q.astype(np.int64).reshape(out, subs, sub) - fmt.zp
    qa_sub = qa.astype(np.int64).reshape(m, subs, sub)
    isum = np.einsum("osk,msk->mos", qw, qa_sub)  # exact: [m, out, subs]
    if fmt.k_type:
        assert u.d is not None
        scale = u.d.astype(np.float64).repeat(256 // sub, axis=1) * u.scale.astype(np.float64)
    else:
        scale = u.scale.astype(np.float64)
    da_sub = da.astype(np.float64).repeat(QBLOCK // sub, axis=1)  # [m, subs]
    terms = isum * scale[None] * da_sub[:, None, :]
    y = terms.sum(axis=2)
    bound = np.abs(terms).sum(axis=2)
    if u.min is not None:
        asum = qa.astype(np.int64).reshape(m, n // QBLOCK, QBLOCK).sum(axis=2)  # [m, blocks]
        if fmt.k_type:
            assert u.dmin is not None
            mins = -u.dmin.astype(np.float64).repeat(8, axis=1) * u.min.astype(np.float64)
        else:
            mins = u.min.astype(np.float64)
        mterms = mins[None] * (da.astype(np.float64) * asum)[:, None, :]
        y = y + mterms.sum(axis=2)
        bound = bound + np.abs(mterms).sum(axis=2)
    return y, bound

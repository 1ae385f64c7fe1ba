"""GGUF quantized tensors unpacked to their integer quants and scales, and repacked into
the native kernels' layout (``streamgen/native/quant_layout.h``), losslessly.

Every supported type is read as the same canonical form, per output row::

    w = scale[sub-block] * (q - zp) + min[block]      q unsigned (4, 5, 6 or 8 bits)

and :func:`pack` turns that form into row groups of 16 rows and tiles of "quad images"
the kernels load straight into registers. Nothing is rounded on the way: the legacy
types keep their fp16 scales, the K types keep their superblock scale (fp16, widened
to fp32) and their 6- or 8-bit sub-scales, so ``scale * (q - zp) + min`` in fp32 is
the value ``gguf.quants.dequantize`` gives (the tests check every type).

Shapes follow numpy (and the HF ``[out_features, in_features]`` linear layout); a GGUF
block never spans two rows.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

from streamgen.native.qkernels import PackedWeight

GROUP_ROWS = 16
QBLOCK = 32


class QuantType(enum.IntEnum):
    """The kernels' weight types; values are ``enum sg_qtype`` in quant_layout.h."""

    Q4_0 = 0
    Q4_1 = 1
    Q5_0 = 2
    Q5_1 = 3
    Q8_0 = 4
    Q4_K = 5
    Q5_K = 6
    Q6_K = 7


@dataclass(frozen=True, slots=True)
class QuantFormat:
    """One row of ``SG_QFORMATS``: how a type's tile is laid out (bytes per 16-row block)."""

    ggml_name: str
    bits: int
    blocks_per_tile: int  # 1, or 8 for a K type's 256-input superblock
    sub: int  # inputs per scale
    zp: int
    has_min: bool
    gguf_block_bytes: int  # bytes of one GGUF block (32 or 256 values)
    qs_bytes: int
    qh_bytes: int
    sc_bytes: int
    mn_bytes: int
    sup_bytes: int

    @property
    def tile_bytes(self) -> int:
        per_block = self.qs_bytes + self.qh_bytes + self.sc_bytes + self.mn_bytes
        return self.blocks_per_tile * per_block + self.sup_bytes

    @property
    def tile_inputs(self) -> int:
        return QBLOCK * self.blocks_per_tile

    @property
    def k_type(self) -> bool:
        return self.blocks_per_tile > 1


FORMATS: dict[QuantType, QuantFormat] = {
    #                                  bits tb sub  zp  min   gguf  qs   qh  sc  mn  sup
    QuantType.Q4_0: QuantFormat("Q4_0", 4, 1, 32, 8, False, 18, 256, 0, 32, 0, 0),
    QuantType.Q4_1: QuantFormat("Q4_1", 4, 1, 32, 0, True, 20, 256, 0, 32, 32, 0),
    QuantType.Q5_0: QuantFormat("Q5_0", 5, 1, 32, 16, False, 22, 256, 64, 32, 0, 0),
    QuantType.Q5_1: QuantFormat("Q5_1", 5, 1, 32, 0, True, 24, 256, 64, 32, 32, 0),
    QuantType.Q8_0: QuantFormat("Q8_0", 8, 1, 32, 128, False, 34, 512, 0, 32, 0, 0),
    QuantType.Q4_K: QuantFormat("Q4_K", 4, 8, 32, 0, True, 144, 256, 0, 16, 16, 128),
    QuantType.Q5_K: QuantFormat("Q5_K", 5, 8, 32, 0, True, 176, 256, 64, 16, 16, 128),
    QuantType.Q6_K: QuantFormat("Q6_K", 6, 8, 16, 32, False, 210, 256, 128, 32, 0, 64),
}
BY_GGML_NAME = {fmt.ggml_name: qtype for qtype, fmt in FORMATS.items()}


@dataclass(frozen=True)
class Unpacked:
    """A tensor's quants and scales, one row per output feature.

    ``scale`` is fp16 ``[out, in / 32]`` for the legacy types; for the K types
    ``scale`` holds the sub-scales (u8 ``[out, in / 32]``, or i8 ``[out, in / 16]`` for
    Q6_K) and ``d`` the fp32 superblock scales ``[out, in / 256]``. ``min`` is fp16
    ``[out, in / 32]`` (Q4_1, Q5_1) or u8 (K types, times ``dmin``), else None.
    """

    qtype: QuantType
    q: np.ndarray  # [out, in] uint8
    scale: np.ndarray
    min: np.ndarray | None = None
    d: np.ndarray | None = None
    dmin: np.ndarray | None = None

    def dequantize(self) -> np.ndarray:  # [out, in] float32
        """The values, computed the way the kernels' dequantizer computes them."""
        fmt = FORMATS[self.qtype]
        q = self.q.astype(np.float32) - np.float32(fmt.zp)
        if fmt.k_type:
            assert self.d is not None
            scale = self.d.repeat(256 // fmt.sub, axis=1) * self.scale.astype(np.float32)
        else:
            scale = self.scale.astype(np.float32)
        values = q * scale.repeat(fmt.sub, axis=1)
        if self.min is not None:
            if fmt.k_type:
                assert self.dmin is not None
                mins = -self.dmin.repeat(8, axis=1) * self.min.astype(np.float32)
            else:
                mins = self.min.astype(np.float32)
            values = values + mins.repeat(QBLOCK, axis=1)
        return values


def _f16(raw: np.ndarray, start: int) -> np.ndarray:  # [blocks, 2] bytes -> [blocks] f16
    return raw[:, start : start + 2].copy().view(np.float16)[:, 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 16] packed bytes -> [blocks, 32]: low nibbles then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes of 6-bit (scale, min) pairs -> [blocks, 8] each."""
    lo, hi, mixed = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([lo & 0x3F, (mixed & 0x0F) | ((lo >> 2) & 0x30)], axis=1)
    mn = np.concatenate([hi & 0x3F, (mixed >> 4) | ((hi >> 2) & 0x30)], axis=1)
    return sc, mn


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """[blocks, 128] -> [blocks, 256]: each 32-byte chunk holds 64 values, low nibbles first."""
    chunks = qs.reshape(-1, 4, 32)
    return np.stack([chunks & 0x0F, chunks >> 4], axis=2).reshape(-1, 256)


def unpack(raw: np.ndarray, qtype: QuantType, in_features: int) -> Unpacked:
    """Decode a GGUF tensor's bytes ``[out, bytes per row]`` (uint8) into canonical form."""
    fmt = FORMATS[qtype]
    out = raw.shape[0]
    if (
        in_features % fmt.tile_inputs
        or raw.shape[1] * fmt.tile_inputs != in_features * fmt.gguf_block_bytes
    ):
        raise ValueError(
            f"{fmt.ggml_name} rows of {in_features} values cannot be {raw.shape[1]} bytes"
        )
    blocks = raw.reshape(-1, fmt.gguf_block_bytes)

    def rows(a: np.ndarray) -> np.ndarray:
        return a.reshape(out, -1)

    if qtype in (QuantType.Q4_0, QuantType.Q4_1):
        off = 2 if qtype == QuantType.Q4_0 else 4
        q = _nibbles(blocks[:, off:])
        mn = rows(_f16(blocks, 2)) if qtype == QuantType.Q4_1 else None
        return Unpacked(qtype, rows(q), rows(_f16(blocks, 0)), mn)
    if qtype in (QuantType.Q5_0, QuantType.Q5_1):
        off = 2 if qtype == QuantType.Q5_0 else 4
        qh = blocks[:, off : off + 4].copy().view("<u4")[:, 0]
        high = ((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
        q = _nibbles(blocks[:, off + 4 :]) | (high << 4)
        mn = rows(_f16(blocks, 2)) if qtype == QuantType.Q5_1 else None
        return Unpacked(qtype, rows(q), rows(_f16(blocks, 0)), mn)
    if qtype == QuantType.Q8_0:
        q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        return Unpacked(qtype, rows(q), rows(_f16(blocks, 0)))
    if qtype in (QuantType.Q4_K, QuantType.Q5_K):
        d = _f16(blocks, 0).astype(np.float32)
        dmin = _f16(blocks, 2).astype(np.float32)
        sc, mn = _k_scales(blocks[:, 4:16])
        if qtype == QuantType.Q4_K:
            q = _k_nibbles(blocks[:, 16:144])
        else:
            qh = blocks[:, 16:48]  # value 32 i + l has its bit 4 at bit i of qh[l]
            bit4 = (qh[:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
            q = _k_nibbles(blocks[:, 48:176]) | (bit4.reshape(-1, 256) << 4).astype(np.uint8)
        return Unpacked(qtype, rows(q), rows(sc), rows(mn), rows(d), rows(dmin))
    if qtype == QuantType.Q6_K:
        ql = blocks[:, 0:128].reshape(-1, 2, 64)  # per 128-value half: 64 bytes, 2 nibbles
        qh = blocks[:, 128:192].reshape(-1, 2, 32)  # per half: 32 bytes, 4 x 2 bits
        low = np.stack([ql & 0x0F, ql >> 4], axis=2).reshape(-1, 2, 128)
        bits45 = (qh[:, :, None, :] >> (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]) & 3
        q = (low | (bits45.reshape(-1, 2, 128) << 4).astype(np.uint8)).reshape(-1, 256)
        sc = blocks[:, 192:208].copy().view(np.int8)
        d = _f16(blocks, 208).astype(np.float32)
        return Unpacked(qtype, rows(q), rows(sc), None, rows(d))
    raise ValueError(f"no unpacking for {qtype!r}")  # pragma: no cover - table is exhaustive


def _quad_images(q: np.ndarray) -> np.ndarray:
    """[out, in] -> [groups, blocks, 8 quads, 64]: byte r * 4 + t of quad j is q[r, 4 j + t]."""
    out, n = q.shape
    g = q.reshape(out // GROUP_ROWS, GROUP_ROWS, n // QBLOCK, 8, 4)
    return g.transpose(0, 2, 3, 1, 4).reshape(out // GROUP_ROWS, n // QBLOCK, 8, 64)


def _per_block(a: np.ndarray, per_block: int) -> np.ndarray:
    """[out, n] per-row values -> [groups, n / per_block, per_block x 16] (row-major by sub)."""
    out, n = a.shape
    g = a.reshape(out // GROUP_ROWS, GROUP_ROWS, n // per_block, per_block)
    return np.ascontiguousarray(g.transpose(0, 2, 3, 1)).reshape(
        out // GROUP_ROWS, n // per_block, -1
    )


def _pad_rows(u: Unpacked) -> Unpacked:
    out = u.q.shape[0]
    extra = -out % GROUP_ROWS
    if not extra:
        return u

    def pad(a: np.ndarray | None) -> np.ndarray | None:
        if a is None:
            return None
        return np.concatenate([a, np.zeros((extra, *a.shape[1:]), dtype=a.dtype)])

    fmt = FORMATS[u.qtype]
    q = pad(u.q)
    assert q is not None
    q[out:] = fmt.zp  # padded rows are exact zeros
    scale = pad(u.scale)
    assert scale is not None
    return Unpacked(u.qtype, q, scale, pad(u.min), pad(u.d), pad(u.dmin))


def pack(u: Unpacked) -> np.ndarray:
    """Canonical form -> the packed bytes ``[groups * tiles * tile_bytes]`` (uint8)."""
    fmt = FORMATS[u.qtype]
    u = _pad_rows(u)
    out, n = u.q.shape
    groups, blocks, tb = out // GROUP_ROWS, n // QBLOCK, fmt.blocks_per_tile
    tiles = blocks // tb
    quads = _quad_images(u.q)  # [G, B, 8, 64]
    parts: list[np.ndarray] = []
    if fmt.bits == 8:
        parts.append(quads.reshape(groups, blocks, 512))
    else:
        low = quads & 0x0F
        parts.append((low[:, :, 0:4] | (low[:, :, 4:8] << 4)).reshape(groups, blocks, 256))
        high = quads >> 4
        shifts = np.arange(4, dtype=np.uint8)[None, None, :, None]
        if fmt.bits == 5:
            plane = np.bitwise_or.reduce(
                high << np.arange(8, dtype=np.uint8)[None, None, :, None], axis=2
            )
            parts.append(plane.reshape(groups, blocks, 64))
        elif fmt.bits == 6:
            planes = [
                np.bitwise_or.reduce(high[:, :, 4 * p : 4 * p + 4] << (2 * shifts), axis=2)
                for p in (0, 1)
            ]
            parts.append(np.stack(planes, axis=2).reshape(groups, blocks, 128))
    per_block_sc = QBLOCK // fmt.sub
    parts.append(_per_block(u.scale, per_block_sc).view(np.uint8).reshape(groups, blocks, -1))
    if u.min is not None:
        parts.append(_per_block(u.min, 1).view(np.uint8).reshape(groups, blocks, -1))
    tiled = [p.reshape(groups, tiles, -1) for p in parts]
    if fmt.k_type:
        assert u.d is not None
        tiled.append(
            _per_block(u.d.astype(np.float32), 1).view(np.uint8).reshape(groups, tiles, -1)
        )
        if u.dmin is not None:
            dmin_neg = -u.dmin.astype(np.float32)
            tiled.append(_per_block(dmin_neg, 1).view(np.uint8).reshape(groups, tiles, -1))
    packed = np.concatenate(tiled, axis=2)
    assert packed.shape[2] == fmt.tile_bytes, (packed.shape, fmt.tile_bytes)
    return packed.reshape(-1)


def packed_weight(u: Unpacked) -> PackedWeight:
    """The kernels' :class:`PackedWeight` of a canonical tensor (rows padded to 16)."""
    import torch

    out, n = u.q.shape
    data = torch.from_numpy(np.ascontiguousarray(pack(u)))
    return PackedWeight(data, int(u.qtype), out, n)

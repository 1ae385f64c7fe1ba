"""The quantized matmul kernels of every ISA this machine runs (and the scalar one),
for every weight type, against numpy references of the same arithmetic.

* Integer part: with unit scales and activations that quantize to themselves, the
  output is an integer sum, exact in fp32 -> must be equal.
* Scales: with random scales, each output is a sum of ``blocks`` terms computed in
  fp32; the error is at most a few fp32 eps of the sum of the terms' magnitudes
  (two roundings per term plus one per accumulation): the bound used is
  ``(blocks + 4) * 2**-23 * sum|term|``.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from streamgen.checkpoint.gguf_quants import FORMATS, QuantType, packed_weight
from streamgen.errors import ConfigError
from streamgen.native.qkernels import Isa, QuantContext, supported_isas
from tests.native.quant_reference import quantize_activations, random_unpacked, reference_gemm

ISAS = supported_isas()
ROWS = (1, 2, 3, 8, 17, 32)


@pytest.fixture(scope="module", params=ISAS, ids=lambda isa: isa.name.lower())
def ctx(request: pytest.FixtureRequest) -> QuantContext:
    return QuantContext.create(isa=request.param, threads=1)


def test_the_scalar_variant_is_always_there() -> None:
    assert Isa.SCALAR in ISAS


@pytest.mark.parametrize("qtype", list(QuantType), ids=lambda t: t.name)
def test_integer_part_is_exact(ctx: QuantContext, qtype: QuantType) -> None:
    rng = np.random.default_rng(int(qtype))
    fmt = FORMATS[qtype]
    out, n = 40, 3 * fmt.tile_inputs  # 40 rows: not a multiple of the 16-row group
    u = random_unpacked(qtype, out, n, rng, unit_scales=True)
    weight = packed_weight(u)
    x = rng.integers(-127, 128, size=(5, n)).astype(np.float32)
    x.reshape(5, -1, 32)[:, :, 0] = 127  # every block's max is 127: d = 1, q = x
    y = ctx.linear(weight, torch.from_numpy(x)).numpy()
    expected = (u.q.astype(np.int64) - fmt.zp) @ x.astype(np.int64).T
    np.testing.assert_array_equal(y, expected.T.astype(np.float32))


@pytest.mark.parametrize("rows", (1, 3, 40))
def test_activation_quantization_is_the_reference_rounding(ctx: QuantContext, rows: int) -> None:
    """Every ISA's quantizer (pooled for big steps) against numpy, bit for bit, with
    values on exact half steps (x = k + 0.5 with amax 127) that only half-to-even gets."""
    rng = np.random.default_rng(rows)
    x = (rng.standard_normal((rows, 96)) * 3).astype(np.float32)
    x[:, 0] = 127.0
    x[:, 1:9] = np.arange(-4, 4) + 0.5  # d = 1: exact halves
    q, d, s16 = ctx.quantize_activations(torch.from_numpy(x))
    ref_q, ref_d = quantize_activations(x)
    np.testing.assert_array_equal(q.numpy(), ref_q)
    np.testing.assert_array_equal(d.numpy(), ref_d)
    np.testing.assert_array_equal(s16.numpy(), ref_q.astype(np.int64).reshape(rows, -1, 16).sum(2))


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("qtype", list(QuantType), ids=lambda t: t.name)
def test_matches_reference_arithmetic(ctx: QuantContext, qtype: QuantType, rows: int) -> None:
    rng = np.random.default_rng(100 * int(qtype) + rows)
    fmt = FORMATS[qtype]
    out, n = 48 + 8, 2 * fmt.tile_inputs + (fmt.tile_inputs if not fmt.k_type else 0)
    u = random_unpacked(qtype, out, n, rng)
    weight = packed_weight(u)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    q, d = quantize_activations(x)
    cq, cd, cs = ctx.quantize_activations(torch.from_numpy(x))
    np.testing.assert_array_equal(cq.numpy(), q)
    np.testing.assert_array_equal(cd.numpy(), d)
    np.testing.assert_array_equal(cs.numpy(), q.astype(np.int64).reshape(rows, -1, 16).sum(2))
    expected, magnitude = reference_gemm(u, q, d)
    y = ctx.gemm(weight, cq, cd, cs).numpy().astype(np.float64)
    blocks = n // 32
    bound = (blocks + 4) * 2.0**-23 * magnitude + 1e-30
    assert (np.abs(y - expected) <= bound).all(), np.abs(y - expected).max()


@pytest.mark.parametrize("qtype", list(QuantType), ids=lambda t: t.name)
def test_a_row_gets_the_same_bits_alone_and_among_others(
    ctx: QuantContext, qtype: QuantType
) -> None:
    """A decode's one or two rows take the kernels' interleaved several-groups path, more
    rows the row tiles: each output's arithmetic is the same, so each row's bits are too
    (what batch invariance rests on). 7 row groups: the interleave's passes and a rest."""
    rng = np.random.default_rng(30 + int(qtype))
    fmt = FORMATS[qtype]
    n = 2 * fmt.tile_inputs
    weight = packed_weight(random_unpacked(qtype, 16 * 7, n, rng))
    x = torch.from_numpy(rng.standard_normal((17, n)).astype(np.float32))
    together = ctx.linear(weight, x)
    for rows in ((0,), (5,), (3, 4), (16,), (2, 7, 9, 11, 13)):
        alone = ctx.linear(weight, x[list(rows)])
        torch.testing.assert_close(alone, together[list(rows)], rtol=0, atol=0)


@pytest.mark.parametrize("qtype", list(QuantType), ids=lambda t: t.name)
def test_dequantize_matches_the_canonical_values(ctx: QuantContext, qtype: QuantType) -> None:
    rng = np.random.default_rng(7 + int(qtype))
    fmt = FORMATS[qtype]
    u = random_unpacked(qtype, 24, 2 * fmt.tile_inputs, rng)
    weight = packed_weight(u)
    np.testing.assert_array_equal(ctx.dequantize(weight).numpy(), u.dequantize())
    rows = torch.tensor([23, 0, 5, 5])
    np.testing.assert_array_equal(
        ctx.dequantize(weight, rows).numpy(), u.dequantize()[[23, 0, 5, 5]]
    )


@pytest.mark.parametrize("bad", ([24], [3, -1], [0, 1 << 40]))
def test_dequantize_refuses_rows_outside_the_weight(ctx: QuantContext, bad: list[int]) -> None:
    weight = packed_weight(random_unpacked(QuantType.Q8_0, 24, 64, np.random.default_rng(3)))
    with pytest.raises(IndexError, match=r"outside \[0, 24\)"):
        ctx.dequantize(weight, torch.tensor(bad))


def test_bias_is_added(ctx: QuantContext) -> None:
    rng = np.random.default_rng(3)
    u = random_unpacked(QuantType.Q8_0, 20, 64, rng)
    bias = torch.from_numpy(rng.standard_normal(20).astype(np.float32))
    weight = packed_weight(u)
    x = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32))
    torch.testing.assert_close(
        ctx.linear(weight.with_bias(bias), x), ctx.linear(weight, x) + bias, rtol=0, atol=1e-6
    )


@pytest.mark.parametrize("threads", [2, 3])
def test_threads_give_the_same_result(threads: int) -> None:
    rng = np.random.default_rng(11)
    u = random_unpacked(QuantType.Q4_K, 16 * 37, 512, rng)
    weight = packed_weight(u)
    x = torch.from_numpy(rng.standard_normal((9, 512)).astype(np.float32))
    one = QuantContext.create(threads=1)
    many = QuantContext.create(threads=threads)
    for _ in range(20):  # many runs through the pool's generations
        torch.testing.assert_close(many.linear(weight, x), one.linear(weight, x), rtol=0, atol=0)
    many.close()


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_resize_swaps_the_pool_in_place() -> None:
    """resize() starts and stops worker threads (counted by the OS) and the struct the
    packed layers point to sees the new pool: the same bits at every size."""
    rng = np.random.default_rng(12)
    u = random_unpacked(QuantType.Q4_1, 16 * 37, 256, rng)
    weight = packed_weight(u)
    x = torch.from_numpy(rng.standard_normal((5, 256)).astype(np.float32))
    ctx = QuantContext.create(threads=1)
    struct = ctx.struct
    expected = ctx.linear(weight, x)
    base = _os_threads()
    for threads, workers in ((3, 2), (2, 1), (1, 0), (4, 3)):
        ctx.resize(threads)
        assert (ctx.threads, _os_threads() - base) == (threads, workers)
        assert ctx.struct is struct and (struct.pool is not None) == (threads > 1)
        for _ in range(5):
            torch.testing.assert_close(ctx.linear(weight, x), expected, rtol=0, atol=0)
    with pytest.raises(ConfigError):
        ctx.resize(0)
    assert ctx.threads == 4
    ctx.close()
    assert _os_threads() == base


@pytest.mark.parametrize("rows", (1, 3, 8))
@pytest.mark.parametrize(
    "qtype", [QuantType.Q4_1, QuantType.Q8_0, QuantType.Q6_K], ids=lambda t: t.name
)
def test_residual_activations_are_two_roundings(
    ctx: QuantContext, qtype: QuantType, rows: int
) -> None:
    """~16-bit activations (the LM head's): x's int8 rounding plus its residual's, each
    row pair summed by the kernel; the reference adds the two same-arithmetic results,
    within the sum of their bounds."""
    from streamgen.model.quantized import PackedLinear

    rng = np.random.default_rng(50 + rows)
    fmt = FORMATS[qtype]
    n = 2 * fmt.tile_inputs
    u = random_unpacked(qtype, 32, n, rng)
    x = rng.standard_normal((rows, n)).astype(np.float32)
    x[:, 5] = 40.0  # an outlier: plain int8 loses the rest of its block
    q1, d1 = quantize_activations(x)
    resid = (x - d1.repeat(32, axis=1) * q1.astype(np.float32)).astype(np.float32)
    q2, d2 = quantize_activations(resid)
    y1, b1 = reference_gemm(u, q1, d1)
    y2, b2 = reference_gemm(u, q2, d2)
    layer = PackedLinear((packed_weight(u),), ctx, residual_activations=True)
    y = layer.forward(torch.from_numpy(x)).numpy().astype(np.float64)
    bound = (n // 32 + 4) * 2.0**-23 * (b1 + b2) + 2.0**-23 * np.abs(y1 + y2)
    assert (np.abs(y - (y1 + y2)) <= bound).all()
    exact = x.astype(np.float64) @ u.dequantize().astype(np.float64).T
    plain = ctx.linear(packed_weight(u), torch.from_numpy(x)).numpy()
    assert np.abs(y - exact).max() < np.abs(plain - exact).max() / 20

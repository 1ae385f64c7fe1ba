"""Quantize-at-load to Q4_K (``native/kquant.c``) against a step-for-step float32 port of
llama.cpp's reference quantizer (``quantize_row_q4_K_ref`` / ``make_qkx2_quants``,
written here from its published arithmetic, one numpy float32 scalar at a time), and
the bytes read back through ``gguf.quants.dequantize``.

The C file was also checked against ``quantize_row_q4_K_ref`` of the llama.cpp build
the bench makes (libggml-base): identical bytes on every block tried.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from streamgen.checkpoint.gguf_quants import QuantType
from streamgen.checkpoint.quantized_model import quantize_state, tensor_type
from streamgen.model.config import ModelSpec, RopeSpec
from streamgen.native.qkernels import QuantContext

F32 = np.float32


@pytest.fixture(scope="module")
def ctx() -> QuantContext:
    return QuantContext.create(threads=2)


def nearest(v: np.float32) -> int:
    return int(np.rint(v))  # ties to even, as the 1.5 * 2^23 trick rounds


def fit(x: list[np.float32], w: list[np.float32]) -> tuple[np.float32, np.float32, list[int]]:
    """make_qkx2_quants(32, 15, x, w, rmin=-1, rdelta=0.1, nstep=20, use_mad=false)."""
    lo, hi, sum_w, sum_x = x[0], x[0], w[0], w[0] * x[0]
    for xi, wi in zip(x[1:], w[1:], strict=True):
        lo, hi = min(lo, xi), max(hi, xi)
        sum_w, sum_x = sum_w + wi, sum_x + wi * xi
    lo = min(lo, F32(0))
    if hi == lo:
        return F32(0), -lo, [0] * 32
    iscale = F32(15) / (hi - lo)
    scale = F32(1) / iscale
    levels = [min(15, max(0, nearest(iscale * (xi - lo)))) for xi in x]
    best = F32(0)
    for xi, wi, li in zip(x, w, levels, strict=True):
        diff = scale * F32(li) + lo - xi
        best = best + wi * (diff * diff)
    for step in range(21):
        iscale = (F32(-1) + F32(0.1) * F32(step) + F32(15)) / (hi - lo)
        trial = [min(15, max(0, nearest(iscale * (xi - lo)))) for xi in x]
        sl = sl2 = sxl = F32(0)
        for xi, wi, li in zip(x, w, trial, strict=True):
            sl, sl2, sxl = sl + wi * F32(li), sl2 + wi * F32(li) * F32(li), sxl + wi * F32(li) * xi
        det = sum_w * sl2 - sl * sl
        if not det > 0:
            continue
        this_scale, this_min = (sum_w * sxl - sum_x * sl) / det, (sl2 * sum_x - sl * sxl) / det
        if this_min > 0:
            this_min, this_scale = F32(0), sxl / sl2
        error = F32(0)
        for xi, wi, li in zip(x, w, trial, strict=True):
            diff = this_scale * F32(li) + this_min - xi
            error = error + wi * (diff * diff)
        if error < best:
            best, scale, lo, levels = error, this_scale, this_min, trial
    return scale, -lo, levels


def reference_q4_k(values: np.ndarray) -> bytes:
    """One 256-value superblock -> its 144 bytes of block_q4_K."""
    x = [F32(v) for v in values]
    scales, mins, levels = [], [], []
    for j in range(8):
        xs = x[32 * j : 32 * j + 32]
        sum_x2 = F32(0)
        for xi in xs:
            sum_x2 = sum_x2 + xi * xi
        av = np.sqrt(sum_x2 / F32(32))
        scale, neg_min, fitted = fit(xs, [av + abs(xi) for xi in xs])
        levels += fitted  # kept where the rounded superblock scale is 0
        scales.append(scale)
        mins.append(neg_min)
    max_scale, max_min = max([F32(0), *scales]), max([F32(0), *mins])
    inv_scale = F32(63) / max_scale if max_scale > 0 else F32(0)
    inv_min = F32(63) / max_min if max_min > 0 else F32(0)
    ls = [min(63, nearest(inv_scale * s)) for s in scales]
    lm = [min(63, nearest(inv_min * m)) for m in mins]
    packed = [0] * 12
    for j in range(8):
        if j < 4:
            packed[j], packed[j + 4] = ls[j], lm[j]
        else:
            packed[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            packed[j - 4] |= (ls[j] >> 4) << 6
            packed[j] |= (lm[j] >> 4) << 6
    d, dmin = np.float16(max_scale / F32(63)), np.float16(max_min / F32(63))
    for j in range(8):
        dj = F32(d) * F32(ls[j])
        if not dj:
            continue
        dm = F32(dmin) * F32(lm[j])
        for i in range(32):
            levels[32 * j + i] = min(15, max(0, nearest((x[32 * j + i] + dm) / dj)))
    qs = [levels[c + i] | (levels[c + i + 32] << 4) for c in range(0, 256, 64) for i in range(32)]
    return d.tobytes() + dmin.tobytes() + bytes(packed) + bytes(qs)


def superblocks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    heavy = rng.standard_normal(256) * rng.exponential(1.0, 256) ** 2
    return {
        "normal": rng.standard_normal(256),
        "heavy tails": heavy,
        "all positive": rng.random(256),
        "all negative": -rng.random(256) - 0.5,
        "one sub-block zero": np.concatenate([np.zeros(32), rng.standard_normal(224)]),
        "constant": np.full(256, 0.25),
        "zeros": np.zeros(256),
        "tiny": rng.standard_normal(256) * 1e-6,
    }


@pytest.mark.parametrize("name", list(superblocks()))
def test_bytes_equal_the_reference_arithmetic(ctx: QuantContext, name: str) -> None:
    values = superblocks()[name].astype(np.float32)
    got = ctx.quantize_q4_k(values[None, :])
    assert got.shape == (1, 144)
    assert got.tobytes() == reference_q4_k(values)


def test_many_rows_split_across_threads_equal_one_row_at_a_time(ctx: QuantContext) -> None:
    rng = np.random.default_rng(3)
    values = rng.standard_normal((37, 768)).astype(np.float32)
    together = ctx.quantize_q4_k(values)
    alone = np.concatenate([ctx.quantize_q4_k(values[r : r + 1]) for r in range(37)])
    np.testing.assert_array_equal(together, alone)
    assert together.shape == (37, 3 * 144)


def test_values_read_back_through_gguf_are_close(ctx: QuantContext) -> None:
    """Q4_K's search beats plain min/max rounding: its error is below Q4_1's."""
    from gguf.quants import quantize

    rng = np.random.default_rng(5)
    values = rng.standard_normal((64, 512)).astype(np.float32)
    q4_k = dequantize(ctx.quantize_q4_k(values), GGMLQuantizationType.Q4_K)
    q4_1 = dequantize(quantize(values, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    rms = float(np.sqrt(np.mean((q4_k - values) ** 2)))
    assert rms < float(np.sqrt(np.mean((q4_1 - values) ** 2)))
    assert rms < 0.1  # 4 bits over a +-3 sigma range: about 6 / 15 / sqrt(12) = 0.12 at worst


def test_rows_that_do_not_split_into_256_are_refused(ctx: QuantContext) -> None:
    with pytest.raises(ValueError, match="multiple of 256"):
        ctx.quantize_q4_k(np.zeros((2, 288), np.float32))


@pytest.mark.parametrize(
    ("in_features", "expected"), [(512, "Q4_K"), (576, "Q5_0"), (48, None), (64, "Q5_0")]
)
def test_fallback_follows_llama_cpp(in_features: int, expected: str | None) -> None:
    assert tensor_type("Q4_K", in_features) == expected


def test_quantize_state_mixes_q4_k_and_its_fallback(ctx: QuantContext) -> None:
    spec = ModelSpec(
        model_type="llama", vocab_size=96, hidden_size=256, intermediate_size=320,
        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-5,
        max_position_embeddings=128, rope=RopeSpec(theta=10000.0), tie_word_embeddings=True,
        qkv_bias=False,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    qkv_out = (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim
    state = {
        "embed_tokens.weight": rand(96, 256),
        "norm.weight": rand(256),
        "layers.0.self_attn.qkv_proj.weight": rand(qkv_out, 256),
        "layers.0.self_attn.o_proj.weight": rand(256, 256),
        "layers.0.mlp.gate_up_proj.weight": rand(640, 256),
        "layers.0.mlp.down_proj.weight": rand(256, 320),
        "layers.0.input_layernorm.weight": rand(256),
        "layers.0.post_attention_layernorm.weight": rand(256),
    }
    weights = quantize_state(state, spec, "q4_k", ctx)
    down = weights["layers.0.mlp.down_proj"]
    qkv = weights["layers.0.self_attn.qkv_proj"]
    assert isinstance(down, tuple) and isinstance(qkv, tuple)
    assert down[0].qtype == QuantType.Q5_0  # 320 inputs: not a multiple of 256
    assert qkv[0].qtype == QuantType.Q4_K
    expected = dequantize(
        ctx.quantize_q4_k(state["layers.0.self_attn.qkv_proj.weight"].numpy()),
        GGMLQuantizationType.Q4_K,
    )
    np.testing.assert_array_equal(ctx.dequantize(qkv[0]).numpy(), expected)

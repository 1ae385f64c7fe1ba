"""The physical limit of a workload on this machine, so every number is also a fraction of it.

Two ceilings, measured at the start of every run with the run's thread count:

* memory: bytes/s of a large array copy (bytes read + bytes written);
* compute: FLOP/s of a large fp32 matmul.

A workload's lower bound on time is the larger of its minimum bytes over the
bandwidth and its FLOPs over the matmul rate. Minimum bytes: every weight once
per forward pass (a request's tokens come one forward after another, so at
least ``max(output_len)`` passes when all run together) plus each decoded
token's read of its KV cache. FLOPs: two per weight per token, plus attention
(QK and PV) over each token's context. The bound is generous to every system:
perfect batching, perfect overlap of compute and memory, no overheads.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from streamgen.model.config import ModelSpec


@dataclass(frozen=True, slots=True)
class MachineLimits:
    """Measured ceilings of this machine at a thread count."""

    threads: int
    copy_bandwidth: float  # bytes/s (read + write)
    matmul_flops: float  # FLOP/s, fp32

    def describe(self) -> str:
        return (
            f"memory {self.copy_bandwidth / 1e9:.1f} GB/s (array copy), "
            f"matmul {self.matmul_flops / 1e9:.1f} GFLOP/s (fp32), {self.threads} threads"
        )


@dataclass(frozen=True, slots=True)
class Precision:
    """Bytes per weight and per KV-cache element a system reads."""

    weight_bytes: float
    kv_bytes: float


@dataclass(frozen=True, slots=True)
class Bound:
    """A workload's lower bound on time, and why."""

    seconds: float
    bytes: float
    flops: float


def _best_time(fn: object, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return best


def _with_threads(threads: int, measure: object) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return float(measure())  # type: ignore[operator]
    finally:
        torch.set_num_threads(previous)


def measure_read_bandwidth(threads: int, size_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Best-of-N bytes/s of a streaming read (a sum over a large fp32 array)."""

    def measure() -> float:
        data = torch.ones(size_bytes // 4)
        data.sum()
        return size_bytes / _best_time(data.sum, repeats)

    return _with_threads(threads, measure)


def measure_copy_bandwidth(threads: int, size_bytes: int = 256 << 20, repeats: int = 5) -> float:
    """Best-of-N bytes/s of copying a large fp32 array (bytes read plus bytes written)."""

    def measure() -> float:
        src = torch.ones(size_bytes // 4)
        dst = torch.empty_like(src)
        dst.copy_(src)
        return 2 * size_bytes / _best_time(lambda: dst.copy_(src), repeats)

    return _with_threads(threads, measure)


def measure_matmul_flops(threads: int, n: int = 1024, repeats: int = 5) -> float:
    """Best-of-N FLOP/s of an ``n x n`` fp32 matmul."""

    def measure() -> float:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        return 2 * n**3 / _best_time(lambda: a @ b, repeats)

    return _with_threads(threads, measure)


def measure_limits(threads: int, quick: bool = False) -> MachineLimits:
    size, n = (64 << 20, 512) if quick else (256 << 20, 1024)
    return MachineLimits(
        threads, measure_copy_bandwidth(threads, size), measure_matmul_flops(threads, n)
    )


def precision(system: str, dtype: str, quantized: bool = False) -> Precision:
    """What a system reads per weight and KV element (llama.cpp: Q4_1 weights, f16 KV;
    streamgen's quantized path: Q4_1 weights, f32 KV)."""
    if system == "llamacpp":
        return Precision(weight_bytes=20 / 32, kv_bytes=2)  # Q4_1: 32 weights in 20 bytes
    if quantized:
        return Precision(weight_bytes=20 / 32, kv_bytes=4)
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return Precision(weight_bytes=size, kv_bytes=size)


def weight_params(spec: ModelSpec) -> int:
    """Weights one forward pass reads: every layer, the final norm and the LM head."""
    h, i = spec.hidden_size, spec.intermediate_size
    per_layer = (
        h * (spec.q_size + 2 * spec.kv_size)  # qkv
        + spec.q_size * h  # o
        + 3 * h * i  # gate, up, down
        + 2 * h  # norms
    )
    return spec.num_layers * per_layer + spec.vocab_size * h + h


def decode_step_bytes(spec: ModelSpec, dtype: torch.dtype, context_len: int) -> int:
    """Minimum bytes one batch-1 decode step reads: every weight once, plus the KV cache."""
    elem = torch.empty((), dtype=dtype).element_size()
    kv = 2 * spec.num_layers * context_len * spec.kv_size
    return (weight_params(spec) + kv) * elem


def _attention_flops(spec: ModelSpec, context_sum: int) -> float:
    """QK and PV over ``context_sum`` (token, key) pairs summed over tokens."""
    return 4.0 * spec.num_layers * spec.q_size * context_sum


def _context_sum(first: int, count: int) -> int:
    """first + (first + 1) + ... over ``count`` tokens."""
    return count * first + count * (count - 1) // 2


def _request_totals(spec: ModelSpec, prompt: int, output: int) -> tuple[float, float, int]:
    """(FLOPs, KV elements read by decode steps, forward passes) of one request alone."""
    decoded = max(0, output - 1)  # the first token comes out of the prefill pass
    tokens = prompt + decoded
    flops = 2.0 * weight_params(spec) * tokens + _attention_flops(spec, _context_sum(1, tokens))
    kv_elems = 2 * spec.num_layers * spec.kv_size * _context_sum(prompt + 1, decoded)
    return flops, kv_elems, 1 + decoded


def workload_bound(
    spec: ModelSpec,
    prec: Precision,
    limits: MachineLimits,
    requests: Sequence[tuple[int, int, float]],
    sequential: bool = False,
) -> Bound:
    """Lower bound on the time to serve ``requests`` = (prompt_len, output_len, arrival_s).

    Concurrent requests share forward passes (lockstep); sequential ones do
    not. A request cannot finish before its arrival plus its own bound.
    """
    weight_bytes = weight_params(spec) * prec.weight_bytes

    def bound(parts: Sequence[tuple[float, float, int]], passes: int) -> Bound:
        flops = sum(p[0] for p in parts)
        nbytes = passes * weight_bytes + sum(p[1] for p in parts) * prec.kv_bytes
        seconds = max(nbytes / limits.copy_bandwidth, flops / limits.matmul_flops)
        return Bound(seconds, nbytes, flops)

    parts = [_request_totals(spec, p, o) for p, o, _ in requests]
    singles = [bound([part], part[2]) for part in parts]
    if sequential:
        return Bound(
            sum(b.seconds for b in singles),
            sum(b.bytes for b in singles),
            sum(b.flops for b in singles),
        )
    together = bound(parts, max((p[2] for p in parts), default=0))
    last = max((r[2] + b.seconds for r, b in zip(requests, singles, strict=True)), default=0.0)
    return Bound(max(together.seconds, last), together.bytes, together.flops)

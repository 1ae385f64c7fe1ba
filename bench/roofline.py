"""The physical limit of a decode step: bytes it must read over measured memory bandwidth."""

from __future__ import annotations

import time

import torch

from streamgen.model.config import ModelSpec


def measure_read_bandwidth(threads: int, size_bytes: int = 512 << 20, repeats: int = 5) -> float:
    """Best-of-N bytes/s of a streaming read (a sum over a large fp32 array)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        data = torch.ones(size_bytes // 4)
        data.sum()
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            data.sum()
            best = min(best, time.perf_counter() - start)
        return size_bytes / best
    finally:
        torch.set_num_threads(previous)


def decode_step_bytes(spec: ModelSpec, dtype: torch.dtype, context_len: int) -> int:
    """Minimum bytes one batch-1 decode step reads: every weight once, plus the KV cache."""
    elem = torch.empty((), dtype=dtype).element_size()
    h, i = spec.hidden_size, spec.intermediate_size
    per_layer = (
        h * (spec.q_size + 2 * spec.kv_size)  # qkv
        + spec.q_size * h  # o
        + 3 * h * i  # gate, up, down
        + 2 * h  # norms
    )
    weights = spec.num_layers * per_layer + spec.vocab_size * h + h  # + lm_head + final norm
    kv = 2 * spec.num_layers * context_len * spec.kv_size
    return (weights + kv) * elem

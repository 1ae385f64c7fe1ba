"""The roofline: bytes a decode step reads, and a workload's lower bound on time."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import make_hf_checkpoint, tiny_hf_config

from bench.roofline import (
    MachineLimits,
    decode_step_bytes,
    measure_read_bandwidth,
    precision,
    weight_params,
    workload_bound,
)
from streamgen.model.config import ModelSpec


def test_step_bytes_count_every_weight_once_plus_kv(tmp_path: Path) -> None:
    config = tiny_hf_config("llama", tie_word_embeddings=True)
    hf_model = make_hf_checkpoint(tmp_path, config)
    unique = {p.data_ptr(): p.numel() for p in hf_model.parameters()}
    spec = ModelSpec.from_hf_config(config)
    num_params = sum(unique.values())
    assert decode_step_bytes(spec, torch.float32, 0) == 4 * num_params
    kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
    assert decode_step_bytes(spec, torch.bfloat16, 10) == 2 * (num_params + 10 * kv_per_token)


def test_read_bandwidth_is_plausible() -> None:
    assert 1e8 < measure_read_bandwidth(1, size_bytes=32 << 20, repeats=2) < 1e12


def test_workload_bound_shares_weight_reads_only_between_concurrent_requests(
    tmp_path: Path,
) -> None:
    config = tiny_hf_config("llama")
    spec = ModelSpec.from_hf_config(config)
    limits = MachineLimits(threads=1, copy_bandwidth=1e9, matmul_flops=1e18)  # memory-bound
    prec = precision("streamgen", "float32")
    one = workload_bound(spec, prec, limits, [(10, 5, 0.0)])
    assert one.bytes >= 5 * 4 * weight_params(spec)  # 5 forward passes, each reads every weight
    two = [(10, 5, 0.0), (10, 5, 0.0)]
    together = workload_bound(spec, prec, limits, two)
    alone = workload_bound(spec, prec, limits, two, sequential=True)
    assert one.seconds < together.seconds < alone.seconds == 2 * one.seconds
    late = workload_bound(spec, prec, limits, [(10, 5, 0.0), (10, 5, 100.0)])
    assert late.seconds >= 100.0 + one.seconds  # the last request cannot finish before it arrives


def test_llama_cpp_reads_q4_weights() -> None:
    assert precision("llamacpp", "float32").weight_bytes == 20 / 32
    assert precision("hf", "bfloat16").weight_bytes == 2

"""The roofline's byte count equals the parameters a decode step reads."""

from __future__ import annotations

from pathlib import Path

import torch
from helpers import make_hf_checkpoint, tiny_hf_config

from bench.roofline import decode_step_bytes, measure_read_bandwidth
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

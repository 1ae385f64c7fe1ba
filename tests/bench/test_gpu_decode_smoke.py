"""bench/gpu_decode.py: the CPU smoke run covers every code path (not the numbers);
the model shapes and the roofline's byte count are checked exactly."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.gpu_decode import decode_step_bytes, llama_3_2_1b_config, main
from streamgen.model.config import ModelSpec


def test_cpu_tiny_run_writes_a_complete_record(tmp_path: Path) -> None:
    out = tmp_path / "gpu_decode.json"
    main(["--device", "cpu", "--tiny", "--out", str(out)])
    record = json.loads(out.read_text())
    rows = {(r["system"], r["batch"], r["cuda_graphs"]): r for r in record["decode"]}
    expected = {(s, b, False) for s in ("streamgen", "hf_generate") for b in (1, 8, 64)}
    assert set(rows) == expected  # no graphs on the CPU
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["roofline_fraction"] > 0
    assert [(a["batch"], a["context"]) for a in record["attention"]] == [(1, 40), (8, 40), (64, 40)]
    for row in record["attention"]:
        assert row["triton_us"] > 0 and row["peer_us"] > 0
        assert row["peer"] == "torch sdpa (dense KV)"
    assert record["copy_bandwidth_bytes_per_s"] > 1e8


def test_model_has_llama_3_2_1b_shapes() -> None:
    from transformers import LlamaForCausalLM

    config = llama_3_2_1b_config()
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sum(unique.values()) == 1_235_814_400  # Llama-3.2-1B, tied embeddings
    spec = ModelSpec.from_hf_config(config)
    assert (spec.num_kv_heads, spec.head_dim, spec.rope.rope_type) == (8, 64, "llama3")


def test_step_bytes_are_every_weight_but_the_embedding_plus_kv() -> None:
    spec = ModelSpec.from_hf_config(llama_3_2_1b_config())
    weights = 1_235_814_400  # the embedding table is the LM head: read once
    kv_per_token = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
    assert decode_step_bytes(spec, torch.bfloat16, 1, 0) == 2 * weights
    assert decode_step_bytes(spec, torch.bfloat16, 8, 100) == 2 * (weights + 800 * kv_per_token)

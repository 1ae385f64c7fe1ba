"""Weights of the converted checkpoint against independent references.

* transformers' own GGUF loader (its own renaming and Q/K un-permutation);
* a hand-written Q4_1 / Q8_0 block decoder, read straight from the GGUF bytes;
* llama.cpp's forward permutation, applied to our output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf_from_hf import llama_cpp_permute

from streamgen.checkpoint.gguf_convert import (
    convert_gguf_to_hf,
    hf_tensor_name,
    unpermute_rotary_rows,
)
from streamgen.errors import UnsupportedModelError

NUM_HEADS = 9
NUM_KV_HEADS = 3


def decode_q4_1(raw: np.ndarray) -> np.ndarray:
    """ggml block_q4_1: fp16 d, fp16 m, 16 bytes of nibbles; x = d * q + m.

    Element j < 16 of a 32-element block is the low nibble of byte j, element
    j >= 16 the high nibble of byte j - 16.
    """
    num_rows = raw.shape[0]
    blocks = raw.reshape(-1, 20)
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    minimum = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    packed = blocks[:, 4:]
    quants = np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(np.float32)
    return (scale * quants + minimum).reshape(num_rows, -1)


def decode_q8_0(raw: np.ndarray) -> np.ndarray:
    """ggml block_q8_0: fp16 d, 32 int8; x = d * q."""
    num_rows = raw.shape[0]
    blocks = raw.reshape(-1, 34)
    scale = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    quants = blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    return (scale * quants).reshape(num_rows, -1)


def test_tensor_names_follow_hf_llama() -> None:
    expected = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
        "blk.1.attn_k.weight": "model.layers.1.self_attn.k_proj.weight",
        "blk.2.attn_v.weight": "model.layers.2.self_attn.v_proj.weight",
        "blk.29.attn_output.weight": "model.layers.29.self_attn.o_proj.weight",
        "blk.3.ffn_gate.weight": "model.layers.3.mlp.gate_proj.weight",
        "blk.3.ffn_up.weight": "model.layers.3.mlp.up_proj.weight",
        "blk.3.ffn_down.weight": "model.layers.3.mlp.down_proj.weight",
        "blk.4.attn_norm.weight": "model.layers.4.input_layernorm.weight",
        "blk.4.ffn_norm.weight": "model.layers.4.post_attention_layernorm.weight",
    }
    for gguf_name, hf_name in expected.items():
        assert hf_tensor_name(gguf_name) == hf_name
    with pytest.raises(UnsupportedModelError):
        hf_tensor_name("blk.0.ffn_gate_exps.weight")


@pytest.mark.parametrize("num_heads", [NUM_HEADS, NUM_KV_HEADS, 1])
def test_unpermute_inverts_llama_cpp_permute(num_heads: int) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((num_heads * 64, 40)).astype(np.float32)
    permuted = llama_cpp_permute(weight, num_heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, num_heads), weight)
    bias = rng.standard_normal(num_heads * 64).astype(np.float32)
    np.testing.assert_array_equal(
        unpermute_rotary_rows(llama_cpp_permute(bias, num_heads), num_heads), bias
    )


def test_non_llama_architecture_is_rejected(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        convert_gguf_to_hf(path, tmp_path / "out", progress=False)


@pytest.fixture(scope="module")
def our_tensors(converted_model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(converted_model_dir / "model.safetensors"))


@pytest.fixture(scope="module")
def gguf_reader(smollm2_gguf: Path) -> Any:
    import gguf

    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def reference_state_dict(smollm2_gguf: Path) -> dict[str, np.ndarray]:
    """transformers' GGUF loader: dequantizes and un-permutes on its own."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    )
    return {name: tensor.detach().numpy().copy() for name, tensor in model.state_dict().items()}


@pytest.mark.real_model
def test_config_is_tied_llama(converted_model_dir: Path) -> None:
    config = json.loads((converted_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is True
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    generation = json.loads((converted_model_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)


@pytest.mark.real_model
def test_weights_equal_transformers_gguf_loader(
    our_tensors: dict[str, np.ndarray], reference_state_dict: dict[str, np.ndarray]
) -> None:
    # Tied embeddings: transformers lists lm_head.weight, the file does not.
    assert "lm_head.weight" not in our_tensors
    assert set(our_tensors) == set(reference_state_dict) - {"lm_head.weight"}
    assert len(our_tensors) == 272
    for name, ours in our_tensors.items():
        reference = reference_state_dict[name]
        assert ours.dtype == np.float32, name
        assert ours.shape == reference.shape, name
        assert np.max(np.abs(ours - reference)) < 1e-6, name


@pytest.mark.real_model
def test_q4_1_and_q8_0_match_hand_decoded_blocks(
    our_tensors: dict[str, np.ndarray], gguf_reader: Any
) -> None:
    raw = {tensor.name: tensor for tensor in gguf_reader.tensors}
    assert raw["token_embd.weight"].tensor_type.name == "Q8_0"
    embed = decode_q8_0(np.asarray(raw["token_embd.weight"].data))
    np.testing.assert_array_equal(our_tensors["model.embed_tokens.weight"], embed)
    for layer in (0, 29):
        up = raw[f"blk.{layer}.ffn_up.weight"]
        assert up.tensor_type.name == "Q4_1"
        np.testing.assert_array_equal(
            our_tensors[f"model.layers.{layer}.mlp.up_proj.weight"],
            decode_q4_1(np.asarray(up.data)),
        )
        # Q and K: llama.cpp's forward permutation of our output gives back the file.
        for gguf_stem, hf_stem, num_heads in (
            ("attn_q", "q_proj", NUM_HEADS),
            ("attn_k", "k_proj", NUM_KV_HEADS),
        ):
            stored = decode_q4_1(np.asarray(raw[f"blk.{layer}.{gguf_stem}.weight"].data))
            ours = our_tensors[f"model.layers.{layer}.self_attn.{hf_stem}.weight"]
            np.testing.assert_array_equal(llama_cpp_permute(ours, num_heads), stored)


@pytest.mark.real_model
def test_converted_model_answers_sensibly(converted_model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(converted_model_dir)
    model = AutoModelForCausalLM.from_pretrained(converted_model_dir, dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    input_ids = torch.tensor([prompt_ids])  # [1, num_prompt_tokens]
    with torch.no_grad():
        output_ids = model.generate(input_ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(output_ids[0, input_ids.shape[1] :])
    assert "Paris" in answer

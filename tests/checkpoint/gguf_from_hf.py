"""Whole GGUF files written from tiny random HF models, as llama.cpp's converter writes
them (``convert_hf_to_gguf.py``): its tensor names, the llama Q/K row permutation (not
for qwen2), its metadata keys, a byte-level BPE tokenizer with its pre-tokenizer type
and chat template. The ``gguf`` package writes the file; nothing of streamgen's is used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CORPUS = [
    "The quick brown fox jumps over the lazy dog. It's 42 degrees; they'll say 3.14159!",
    "def f(x):\n    return x ** 2  # square\n\nfor i in range(10): print(i, f(i))",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "I'm sure we've done it, you'd think. Numbers: 1234567890, 2026-12-01.",
] * 20

_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def train_tokenizer(vocab_size: int = 320) -> Any:
    """A byte-level BPE (``tokenizers.Tokenizer``) with ChatML's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The permutation llama.cpp's converter applies to a llama file's Q and K rows."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(model: Any, arch: str) -> dict[str, np.ndarray]:
    """The HF model's float32 weights under llama.cpp's names, [out, in] numpy order."""
    config = model.config
    tensors: dict[str, np.ndarray] = {}
    for name, param in model.state_dict().items():
        values = param.detach().float().numpy().copy()
        if name == "lm_head.weight":
            if config.tie_word_embeddings:
                continue
            tensors["output.weight"] = values
            continue
        if name == "model.embed_tokens.weight":
            tensors["token_embd.weight"] = values
            continue
        if name == "model.norm.weight":
            tensors["output_norm.weight"] = values
            continue
        _, _, layer, rest = name.split(".", 3)
        module, suffix = rest.rsplit(".", 1)
        gguf_name = f"blk.{layer}.{_LAYER_NAMES[module]}.{suffix}"
        if arch == "llama" and module == "self_attn.q_proj":
            values = llama_cpp_permute(values, config.num_attention_heads)
        elif arch == "llama" and module == "self_attn.k_proj":
            values = llama_cpp_permute(values, config.num_key_value_heads)
        tensors[gguf_name] = values
    return tensors


def write_gguf_from_hf(
    path: Path,
    model: Any,
    tokenizer: Any,
    arch: str,
    *,
    weight_type: str = "F32",
    quantize_q4_k: Any = None,
) -> Path:
    """``model`` (a tiny HF Llama / Qwen2 / Qwen3) and ``tokenizer`` as a GGUF file of
    ``arch``.

    Linear weights and embeddings take ``weight_type`` (``F32``, ``Q8_0``, or ``Q4_K``,
    quantized by ``quantize_q4_k`` with Q8_0 for rows 256 does not divide); norms and
    biases stay F32, as llama.cpp keeps them."""
    config = model.config
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if arch == "qwen3":  # llama.cpp's converter writes the head size for Qwen3
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(0)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    raw_merges = json.loads(tokenizer.to_str())["model"]["merges"]
    merges = [" ".join(m) if isinstance(m, list) else m for m in raw_merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2" if arch in ("qwen2", "qwen3") else "gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [TokenType.CONTROL if t in SPECIALS else TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(vocab["<|endoftext|>"])
    writer.add_eos_token_id(vocab["<|im_end|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    for name, values in gguf_tensors(model, arch).items():
        kind = weight_type if values.ndim == 2 else "F32"
        if kind == "Q4_K" and values.shape[1] % 256:
            kind = "Q8_0"
        if kind == "F32":
            writer.add_tensor(name, values.astype(np.float32))
        elif kind == "Q4_K":
            raw = quantize_q4_k(values)
            writer.add_tensor(name, raw, raw_dtype=GGMLQuantizationType.Q4_K)
        else:
            qtype = GGMLQuantizationType[kind]
            writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

"""Whole GGUF files written from tiny random HF models, as llama.cpp's converter writes
them (``convert_hf_to_gguf.py`` and its ``conversion/`` modules, read in the llama.cpp of
the llama-cpp-python 0.3.36 sdist): its tensor names per family, the Q/K row permutation
of its Llama converter (llama, granite), Gemma's norms stored as 1 + w, Phi-3's fused
projections and rope factor tensors, its metadata keys, a byte-level BPE tokenizer with
its pre-tokenizer type and chat template, or a sentencepiece vocabulary as it writes
one. The ``gguf`` package writes the file; nothing of streamgen's is used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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
    "self_attn.qkv_proj": "attn_qkv",  # Phi-3, kept fused
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",  # Phi-3, kept fused (gate rows first)
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}
# Where a family's norms differ (gguf-py's tensor map for its architecture): the layer
# output norms of OLMo 2 and Gemma, Gemma's pre-MLP norm.
_FAMILY_NAMES = {
    "olmo2": {"post_attention_layernorm": "post_attention_norm",
              "post_feedforward_layernorm": "post_ffw_norm"},
    "gemma2": {"post_attention_layernorm": "post_attention_norm",
               "pre_feedforward_layernorm": "ffn_norm",
               "post_feedforward_layernorm": "post_ffw_norm"},
}  # fmt: skip
_FAMILY_NAMES["gemma3"] = _FAMILY_NAMES["gemma2"]
# Families whose converter stores every norm as 1 + w (Gemma's RMSNorm scales by 1 + w).
_NORM_PLUS_ONE = frozenset({"gemma2", "gemma3"})
# Families whose Q / K rows llama.cpp permutes (its LlamaModel converter and subclasses).
_PERMUTED = frozenset({"llama", "granite"})


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
    """The HF model's float32 weights under llama.cpp's names, [out, in] numpy order,
    transformed as its converter does for ``arch``."""
    config = model.config
    names = {**_LAYER_NAMES, **_FAMILY_NAMES.get(arch, {})}
    tensors: dict[str, np.ndarray] = {}
    for name, param in model.state_dict().items():
        values = param.detach().float().numpy().copy()
        if arch in _NORM_PLUS_ONE and name.endswith("norm.weight"):
            values = values + 1
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
        gguf_name = f"blk.{layer}.{names[module]}.{suffix}"
        if arch in _PERMUTED and module == "self_attn.q_proj":
            values = llama_cpp_permute(values, config.num_attention_heads)
        elif arch in _PERMUTED and module == "self_attn.k_proj":
            values = llama_cpp_permute(values, config.num_key_value_heads)
        tensors[gguf_name] = values
    return tensors


def _family_metadata(writer: GGUFWriter, config: Any, arch: str, head_dim: int) -> None:
    """The keys llama.cpp's converter writes for ``arch`` beyond the Llama ones."""
    if arch in ("qwen3", "gemma2", "gemma3"):  # a head size of its own
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "granite":
        writer.add_attention_scale(config.attention_multiplier)
        writer.add_embedding_scale(config.embedding_multiplier)
        writer.add_residual_scale(config.residual_multiplier)
        writer.add_logit_scale(config.logits_scaling)
    if arch == "phi3":
        rope = config.rope_parameters
        rotated = int(rope.get("partial_rotary_factor", 1.0) * config.hidden_size) // (
            config.num_attention_heads
        )
        writer.add_rope_dimension_count(rotated)
        writer.add_rope_scaling_orig_ctx_len(
            rope.get("original_max_position_embeddings") or config.max_position_embeddings
        )
        writer.add_sliding_window(config.sliding_window or 0)
        if rope.get("rope_type") == "longrope":
            writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], np.float32))
            writer.add_tensor(
                "rope_factors_short.weight", np.array(rope["short_factor"], np.float32)
            )
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
        writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma3":
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        writer.add_sliding_window(config.sliding_window)
        local = config.rope_parameters.get("sliding_attention", {}).get("rope_theta")
        if local is not None:
            writer.add_rope_freq_base_swa(local)


def _write_bpe_vocab(writer: GGUFWriter, tokenizer: Any, arch: str) -> None:
    """A byte-level BPE vocabulary as the converter's ``_set_vocab_gpt2`` writes it."""
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


@dataclass(frozen=True)
class SentencePieceVocab:
    """A sentencepiece model's vocabulary, written as the converter's
    ``_set_vocab_sentencepiece`` writes it (``_create_vocab_sentencepiece``: every piece
    with its score and type; the special ids and ``add_bos_token`` from the model's
    tokenizer config, which ``SpecialVocab`` reads; Gemma and Phi-3 add
    ``add_space_prefix = False``)."""

    model: bytes  # a serialized sentencepiece ModelProto
    add_bos: bool
    add_space_prefix: bool | None  # None: the key is not written (llama)
    chat_template: str

    def processor(self) -> Any:
        from sentencepiece import SentencePieceProcessor

        return SentencePieceProcessor(model_proto=self.model)

    def write(self, writer: GGUFWriter) -> None:
        sp = self.processor()
        tokens, scores, types = [], [], []
        for i in range(sp.vocab_size()):
            tokens.append(sp.id_to_piece(i).encode("utf-8"))
            scores.append(sp.get_score(i))
            types.append(
                TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i)
                else TokenType.NORMAL
            )  # fmt: skip
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(sp.bos_id())
        writer.add_eos_token_id(sp.eos_id())
        writer.add_unk_token_id(sp.unk_id())
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        writer.add_chat_template(self.chat_template)


def train_sentencepiece(
    *, add_dummy_prefix: bool, control: tuple[str, ...] = (), vocab_size: int = 400
) -> bytes:
    """A BPE sentencepiece model trained on CORPUS as Llama's and Gemma's were
    configured: byte fallback, digits split, whitespace kept as written (no
    normalization), whitespace-only pieces; ``add_dummy_prefix`` as the family has it."""
    import io

    from sentencepiece import SentencePieceTrainer

    out = io.BytesIO()
    SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=out, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, split_digits=True,
        add_dummy_prefix=add_dummy_prefix, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, control_symbols=list(control),
        minloglevel=2,
    )  # fmt: skip
    return out.getvalue()


def write_gguf_from_hf(
    path: Path,
    model: Any,
    tokenizer: Any,
    arch: str,
    *,
    weight_type: str = "F32",
    quantize_q4_k: Any = None,
) -> Path:
    """``model`` (a tiny HF model of the family ``arch`` names) and ``tokenizer`` (a
    byte-level BPE ``tokenizers.Tokenizer`` or a ``SentencePieceVocab``) as a GGUF file of
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
    _family_metadata(writer, config, arch, head_dim)
    rope = getattr(config, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: the global layers' base
    if arch != "gemma2":  # its converter writes no rope base: llama.cpp assumes 10,000
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(0)
    if isinstance(tokenizer, SentencePieceVocab):
        tokenizer.write(writer)
    else:
        _write_bpe_vocab(writer, tokenizer, arch)
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


# Per family, what the tiny model sets beyond the common sizes: each family's own fields,
# at the values llama.cpp would infer from the file (Gemma: its query scale is 1 /
# sqrt(head size), Gemma 3 has five sliding layers in six, Gemma 2 every other and a
# rope base of 10,000: its converter writes none).
FAMILY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(tie_word_embeddings=False),
    "qwen2": dict(),
    "qwen3": dict(head_dim=48),  # a head size of its own (4 x 48 != 256): key_length
    "granite": dict(attention_multiplier=0.1, embedding_multiplier=3.0,
                    residual_multiplier=0.4, logits_scaling=2.5, tie_word_embeddings=False),
    "olmo2": dict(tie_word_embeddings=False),
    "phi3": dict(pad_token_id=0, partial_rotary_factor=0.5, max_position_embeddings=512,
                 original_max_position_embeddings=128, sliding_window=None,
                 rope_scaling={"rope_type": "longrope",
                               "long_factor": [1.0 + 0.1 * i for i in range(16)],
                               "short_factor": [1.0 + 0.05 * i for i in range(16)]}),
    "gemma2": dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=8, rope_theta=1e4,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "gemma3": dict(head_dim=64, query_pre_attn_scalar=64, sliding_window=8,
                   num_hidden_layers=6, final_logit_softcapping=3.0,
                   rope_local_base_freq=10_000.0),
}  # fmt: skip
MODEL_TYPES = {"gemma3": "gemma3_text"}


def tiny_config(arch: str, vocab_size: int) -> Any:
    from transformers import AutoConfig

    fields: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1e6,
    )  # fmt: skip
    fields.update(FAMILY_CONFIGS[arch])
    return AutoConfig.for_model(MODEL_TYPES.get(arch, arch), **fields)

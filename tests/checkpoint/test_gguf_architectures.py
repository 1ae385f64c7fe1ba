"""GGUF files of each supported architecture, written as llama.cpp's converter writes
them from tiny random HF models (``gguf_from_hf.py``): served dense, their logits equal
HF transformers' on the original weights; served quantized, they track the dense model
built from the same file; the tokenizer splits text as llama.cpp's pre-tokenizer does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import regex
import torch
from gguf_from_hf import CHATML, MODEL_TYPES, tiny_config, train_tokenizer, write_gguf_from_hf

from streamgen import load_model
from streamgen.checkpoint.gguf_architectures import GGUF_ARCHITECTURES
from streamgen.errors import UnsupportedModelError
from streamgen.native.qkernels import QuantContext
from streamgen.runner.batch import ModelBatch, SequenceChunk
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner

ARCHS = sorted(GGUF_ARCHITECTURES)
PROMPT = "The quick brown fox: 3.14159, they'll say.\n"
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 regex (llama-vocab.cpp), case-folded contractions.
QWEN2_SPLIT = regex.compile(
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@pytest.fixture(scope="module")
def bpe() -> Any:
    return train_tokenizer()


@pytest.fixture(scope="module", params=ARCHS)
def hf_and_files(request: pytest.FixtureRequest, bpe: Any, tmp_path_factory: Any) -> Any:
    from transformers import AutoModelForCausalLM

    arch = request.param
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(arch, bpe.get_vocab_size()), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.2 if "norm" in name else 0.08
            param.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn_like(param))
    directory = tmp_path_factory.mktemp(arch)
    ctx = QuantContext.create(threads=1)
    files = {
        kind: write_gguf_from_hf(
            directory / f"tiny-{kind}.gguf", model, bpe, arch, weight_type=kind,
            quantize_q4_k=ctx.quantize_q4_k,
        )
        for kind in ("F32", "Q4_K")
    }  # fmt: skip
    return arch, model, files


def forward(loaded: Any, ids: list[int]) -> torch.Tensor:  # [len(ids), vocab]
    runner = ModelRunner(loaded, KVCacheConfig(block_size=16, num_blocks=16))
    blocks = list(range(-(-len(ids) // 16)))
    return runner.forward_logits(ModelBatch([SequenceChunk("r", ids, 0, blocks)]))


def test_dense_logits_equal_hf_on_the_original_weights(hf_and_files: Any) -> None:
    arch, model, files = hf_and_files
    loaded = load_model(files["F32"], quantization=None)
    assert loaded.spec.model_type == MODEL_TYPES.get(arch, arch)
    assert loaded.spec.qkv_bias == (arch == "qwen2")
    assert loaded.spec.qk_norm == (arch in ("qwen3", "olmo2", "gemma3"))
    assert loaded.spec.head_dim == (48 if arch == "qwen3" else 64)
    ids = loaded.tokenizer.encode(PROMPT)
    assert len(ids) > 8  # past Gemma's 8-token window: the sliding layers matter
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(forward(loaded, ids), expected, atol=1e-4, rtol=0)


def test_quantized_file_tracks_its_dense_values(hf_and_files: Any) -> None:
    """Q4_K weights (Q8_0 for the 512-wide down projection) on the int8 path against the
    same file's values dequantized: the only difference left is int8 activation rounding
    (~0.4% per matmul), compounding over 7 matmuls a layer. Measured max |q - d| over the
    logits' standard deviation: 0.07-0.15 for the 2-layer models, 0.46 for Gemma 3's 6
    layers; argmax agreement 0.90-1.0 over the 29-31 positions (2 flips at most; random
    logits would agree on ~0.3%). The bounds allow about 2x the error per layer."""
    arch, _, files = hf_and_files
    quantized = load_model(files["Q4_K"], threads=1)
    dense = load_model(files["Q4_K"], quantization=None)
    ids = quantized.tokenizer.encode(PROMPT)
    q, d = forward(quantized, ids), forward(dense, ids)
    layers = dense.spec.num_layers
    assert (q - d).abs().max().item() <= 0.25 * (layers / 2) * d.std().item(), arch
    assert (q.argmax(-1) == d.argmax(-1)).float().mean().item() >= 0.85, arch


def test_tokenizer_pre_tokenizes_as_llama_cpp(hf_and_files: Any, bpe: Any) -> None:
    arch, _, files = hf_and_files
    tokenizer = load_model(files["F32"], quantization=None).tokenizer
    text = "I'M sure they'll pay 1234 or 56.78\n\n  ok?  \tdone"
    if arch in ("qwen2", "qwen3"):  # each piece of llama.cpp's split encoded alone, joined
        expected = [i for piece in QWEN2_SPLIT.findall(text) for i in bpe.encode(piece).ids]
    else:  # gpt2 pre-type: the BPE's own byte-level split
        expected = bpe.encode(text).ids
    assert tokenizer.encode(text) == expected
    assert tokenizer.decode(expected) == text


def test_chat_template_comes_from_the_file(hf_and_files: Any) -> None:
    from jinja2 import Template

    _, _, files = hf_and_files
    tokenizer = load_model(files["F32"], quantization=None).tokenizer
    messages = [{"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == Template(CHATML).render(messages=messages, add_generation_prompt=True)


def test_other_architectures_name_the_supported_ones(tmp_path: Path) -> None:
    import numpy as np
    from gguf_files import tiny_llama_tensors, write_tiny_llama

    path = write_tiny_llama(
        tmp_path / "bloom.gguf", tiny_llama_tensors(np.random.default_rng(0)), arch="bloom"
    )
    with pytest.raises(UnsupportedModelError, match=r"'bloom'.*\['gemma2', 'gemma3', 'granite'"):
        load_model(path)


def test_layouts_this_reader_does_not_serve_are_typed_errors(
    hf_and_files: Any, tmp_path: Path
) -> None:
    """An OLMo 3 file (olmo2 with sliding windows) and a Phi-3 file with one of its two
    rope factor tensors are refused before anything is loaded, naming the key / tensor."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    from streamgen.errors import ModelLoadError

    arch, _, files = hf_and_files
    if arch not in ("olmo2", "phi3"):
        pytest.skip("an olmo2 and a phi3 file")
    reader = GGUFReader(files["F32"])
    writer = GGUFWriter(str(tmp_path / "edited.gguf"), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        writer.add_key_value(field.name, field.contents(), field.types[0],
                             field.types[-1] if len(field.types) > 1 else None)  # fmt: skip
    if arch == "olmo2":
        writer.add_sliding_window(4)
    for tensor in reader.tensors:
        if tensor.name == "rope_factors_short.weight":
            continue  # phi3: the long factors alone
        writer.add_tensor(tensor.name, np.array(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    error, match = {
        "olmo2": (UnsupportedModelError, "olmo2.attention.sliding_window"),
        "phi3": (ModelLoadError, "rope_factors"),
    }[arch]
    with pytest.raises(error, match=match):
        load_model(tmp_path / "edited.gguf")

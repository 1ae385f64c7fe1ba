"""GGUF files with a sentencepiece vocabulary (``tokenizer.ggml.model = "llama"``: Llama 2
and Mistral files, Phi-3, Gemma 2 and 3), written as llama.cpp's converter writes them
from a sentencepiece model: the tokenizer streamgen builds from the file splits text
into the ids sentencepiece itself gives (the library those models were trained and
shipped with, and whose splits llama.cpp's tokenizer reproduces), adds BOS as the file
says, keeps the chat template's control tokens whole, and decodes back to the text.
"""

from __future__ import annotations

from typing import Any

import pytest
import regex
import torch
from gguf_from_hf import SentencePieceVocab, tiny_config, train_sentencepiece, write_gguf_from_hf

from streamgen import load_model
from streamgen.text import IncrementalDetokenizer

pytest.importorskip("sentencepiece")

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, and   three inside",
    "line one\nline two\n\n\tindented\r\n",
    "Numbers: 1234567890 and 3.14159, 2026-12-01.",
    "def f(x):\n    return x ** 2  # square\n",
    "naïve café, 東京, 🙂: bytes the vocabulary never saw",
    "I'm sure they'll say 'it's 42'!",
    " ",
    "",
]
GEMMA_TURNS = ("<start_of_turn>", "<end_of_turn>")
PHI3_TURNS = ("<|user|>", "<|assistant|>", "<|end|>")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}<start_of_turn>model\n"
)
PHI3_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "<|assistant|>\n"
)
# Per family as its converter writes it: Llama's sentencepiece model adds a dummy
# prefix and its files add BOS; Phi-3's the same prefix, no BOS (its tokenizer config);
# Gemma's no prefix (add_space_prefix = False), BOS, and its turn markers as control
# tokens.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": dict(add_dummy_prefix=True, add_bos=True, add_space_prefix=None,
                  control=(), template=GEMMA_TEMPLATE.replace("<start_of_turn>", "[INST]")),
    "phi3": dict(add_dummy_prefix=True, add_bos=False, add_space_prefix=None,
                 control=PHI3_TURNS, template=PHI3_TEMPLATE),
    "gemma2": dict(add_dummy_prefix=False, add_bos=True, add_space_prefix=False,
                   control=GEMMA_TURNS, template=GEMMA_TEMPLATE),
    "gemma3": dict(add_dummy_prefix=False, add_bos=True, add_space_prefix=False,
                   control=GEMMA_TURNS, template=GEMMA_TEMPLATE),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_file(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Any:
    from transformers import AutoModelForCausalLM

    arch = request.param
    family = FAMILIES[arch]
    vocab = SentencePieceVocab(
        model=train_sentencepiece(
            add_dummy_prefix=family["add_dummy_prefix"], control=family["control"]
        ),
        add_bos=family["add_bos"],
        add_space_prefix=family["add_space_prefix"],
        chat_template=family["template"],
    )
    sp = vocab.processor()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, sp.vocab_size())).eval()
    path = write_gguf_from_hf(tmp_path_factory.mktemp(arch) / "tiny.gguf", model, vocab, arch)
    return arch, sp, load_model(path, quantization=None)


def test_text_splits_as_sentencepiece_splits_it(family_file: Any) -> None:
    arch, sp, loaded = family_file
    bos = [sp.bos_id()] if FAMILIES[arch]["add_bos"] else []
    for text in TEXTS:
        assert loaded.tokenizer.encode(text) == bos + sp.encode(text), (arch, text)


def test_ids_decode_back_to_the_text(family_file: Any) -> None:
    """Whole, and streamed a token at a time as the engine streams them (bytes the
    vocabulary lacks come as <0xNN> tokens: a character is held until it is whole)."""
    arch, sp, loaded = family_file
    for text in TEXTS:
        ids = sp.encode(text)
        assert loaded.tokenizer.decode(ids) == sp.decode(ids) == text, (arch, text)
        detokenizer = IncrementalDetokenizer(loaded.tokenizer, [])
        streamed = "".join(detokenizer.add([i]) for i in ids) + detokenizer.flush()
        assert streamed == text, (arch, text)


def llama_cpp_reference(sp: Any, text: str, controls: tuple[str, ...]) -> list[int]:
    """llama.cpp's sentencepiece tokenization of a text that may hold control tokens:
    each control token is its id, and each run of text between them is encoded on its
    own, with the space prefix in front of every run (``is_prev_special``), which is
    what sentencepiece does to any text it is given."""
    pattern = regex.compile("(" + "|".join(regex.escape(c) for c in controls) + ")")
    ids: list[int] = []
    for piece in pattern.split(text):
        if piece in controls:
            ids.append(sp.piece_to_id(piece))
        elif piece:
            ids.extend(sp.encode(piece))
    return ids


def test_the_chat_template_encodes_as_llama_cpp_does(family_file: Any) -> None:
    """The rendered template's control tokens stay whole and the text between them is
    split as llama.cpp splits it."""
    arch, sp, loaded = family_file
    messages = [{"role": "user", "content": "Name a colour.  Two spaces."}]
    render = loaded.tokenizer.apply_chat_template
    text = render(messages, add_generation_prompt=True, tokenize=False)
    ids = render(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    special = (sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()))
    controls = (*special, *FAMILIES[arch]["control"])
    assert ids == llama_cpp_reference(sp, text, controls), (arch, text)
    for marker in FAMILIES[arch]["control"]:
        assert ids.count(sp.piece_to_id(marker)) == text.count(marker) > 0, (arch, marker)


def test_eos_is_the_files(family_file: Any) -> None:
    _, sp, loaded = family_file
    assert loaded.tokenizer.eos_token_id == sp.eos_id()

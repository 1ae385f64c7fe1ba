"""The converted SmolLM2 tokenizer pre-tokenizes like llama.cpp's ``smollm`` type.

The reference below is written from llama.cpp's definition, independently of
``tokenizers``: the regex ``\\p{N}`` splits every digit off, then the GPT-2
regex splits each piece; unmatched gaps stay pieces of their own.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import regex

from streamgen.checkpoint.gguf_convert import llama_cpp_pre_tokenizer

DIGIT_PATTERN = regex.compile(r"\p{N}")
GPT2_PATTERN = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
)

TRICKY_STRINGS = [
    "12345",
    "3.14159",
    "  0.",
    "a    b",
    "a\tb\t\tc",
    "line one\nline two\n\n  indented\r\n",
    "x=1,000,000",
    "naïve 東京 🙂",
    "I'm sure they'll say 'it's 42'",
    "def f(x):\n    return x**2  # square\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "   leading and trailing   ",
    "version 2.0.1-beta+exp.sha.5114f85",
    "١٢٣ ٤٥٦",  # Arabic-Indic digits are \p{N} too
    "",
]


def split_keeping_gaps(pattern: regex.Pattern[str], text: str) -> list[str]:
    """Split ``text`` into the matches of ``pattern`` and the gaps between them."""
    pieces: list[str] = []
    position = 0
    for match in pattern.finditer(text):
        if match.start() > position:
            pieces.append(text[position : match.start()])
        pieces.append(match.group())
        position = match.end()
    if position < len(text):
        pieces.append(text[position:])
    return [piece for piece in pieces if piece]


def llama_cpp_smollm_pieces(text: str) -> list[str]:
    """llama.cpp's ``smollm`` pre-tokenization: the two regexes in sequence."""
    return [
        piece
        for digit_piece in split_keeping_gaps(DIGIT_PATTERN, text)
        for piece in split_keeping_gaps(GPT2_PATTERN, digit_piece)
    ]


@cache
def byte_level_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` table."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codepoints = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codepoints.append(256 + extra)
            extra += 1
    return {chr(codepoint): byte for byte, codepoint in zip(printable, codepoints, strict=True)}


def byte_level_to_text(piece: str, errors: str = "strict") -> str:
    return bytes(byte_level_decoder()[char] for char in piece).decode("utf-8", errors)


@pytest.fixture(scope="module")
def tokenizer(converted_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(converted_model_dir)


def test_reference_splits_double_space_before_digit() -> None:
    # Sanity check of the reference itself.
    assert llama_cpp_smollm_pieces("  0.") == ["  ", "0", "."]
    assert llama_cpp_smollm_pieces("a 12") == ["a", " ", "1", "2"]


def test_known_pre_types_map_to_digits_then_byte_level() -> None:
    pre_tokenizer = llama_cpp_pre_tokenizer("smollm")
    assert pre_tokenizer is not None
    pieces = [piece for piece, _ in pre_tokenizer.pre_tokenize_str("x  12")]
    assert pieces == ["x", "ĠĠ", "1", "2"]
    assert [p for p, _ in pre_tokenizer.pre_tokenize_str("  0.")] == ["ĠĠ", "0", "."]
    for pre_type in ("starcoder", "refact", "command-r", "codeshell"):
        assert llama_cpp_pre_tokenizer(pre_type) is not None


def test_gpt2_pre_type_keeps_default_silently(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert llama_cpp_pre_tokenizer("gpt2") is None
        assert llama_cpp_pre_tokenizer(None) is None
    assert not caplog.records


def test_unknown_pre_type_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert llama_cpp_pre_tokenizer("some-future-type") is None
    assert any("some-future-type" in record.getMessage() for record in caplog.records)


@pytest.mark.real_model
@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_pre_tokenizer_matches_llama_cpp(tokenizer: Any, text: str) -> None:
    pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
    decoded = [byte_level_to_text(piece) for piece, _ in pieces]
    assert decoded == llama_cpp_smollm_pieces(text)


@pytest.mark.real_model
@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_digits_are_single_tokens(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    for token in tokenizer.convert_ids_to_tokens(ids):
        # A token may hold part of a multi-byte character.
        token_text = byte_level_to_text(token, errors="replace")
        if DIGIT_PATTERN.search(token_text):
            assert len(token_text) == 1, f"{token_text!r} holds a digit and more"


@pytest.mark.real_model
@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_decode_inverts_encode(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text


@pytest.mark.real_model
def test_double_space_before_digit_is_one_token(tokenizer: Any) -> None:
    assert tokenizer.tokenize("  0.") == ["ĠĠ", "0", "."]


@pytest.mark.real_model
def test_special_tokens(tokenizer: Any) -> None:
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.bos_token_id == 1
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [2]
    # SmolLM2 adds no BOS: the chat template writes <|im_start|> itself.
    assert tokenizer.encode("hi", add_special_tokens=True) == tokenizer.encode(
        "hi", add_special_tokens=False
    )
    assert len(tokenizer) == 49152
    assert tokenizer.model_max_length == 8192


@pytest.mark.real_model
def test_chat_template_renders_chatml(tokenizer: Any) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\n"
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, *messages]
    rendered = tokenizer.apply_chat_template(
        with_system, tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )

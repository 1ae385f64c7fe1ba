"""IncrementalDetokenizer: streamed deltas against ``tokenizer.decode`` of the
whole output, with the real SmolLM2 tokenizer (byte-level BPE) and a tiny
sentencepiece-style tokenizer whose multi-byte characters go through
``<0xNN>`` byte-fallback tokens."""

from __future__ import annotations

import random
import string
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from streamgen.text import IncrementalDetokenizer

REPLACEMENT_CHAR = "\ufffd"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "naïve café",
    "你好，世界！这是一个测试。",
    "🙂🎉👍🏽",
    "def f(x):\n    return x ** 2 + 31415926  # 🙂 ok",
    "a  b   c    d\t\t e     ",
    "Mixed: Grüße, 東京 2024年, αβγ, 👩‍👩‍👧 family!",
]

# --------------------------------------------------------------------------- helpers


def chunk(ids: Sequence[int], rng: random.Random, max_size: int = 4) -> list[list[int]]:
    chunks: list[list[int]] = []
    i = 0
    while i < len(ids):
        size = rng.randint(1, max_size)
        chunks.append(list(ids[i : i + size]))
        i += size
    return chunks


def stream(
    tokenizer: Any,
    chunks: Sequence[Sequence[int]],
    *,
    prompt_ids: Sequence[int] = (),
    skip_special_tokens: bool = True,
) -> list[str]:
    """Feeds ``chunks``, checking after each one that the text so far is the
    decode of the ids so far whenever that decode ends on a whole character;
    returns every delta, the flush last."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens)
    deltas: list[str] = []
    ids: list[int] = []
    for token_ids in chunks:
        ids.extend(token_ids)
        deltas.append(detok.add(token_ids))
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if not expected.endswith(REPLACEMENT_CHAR):
            assert "".join(deltas) == expected
    deltas.append(detok.flush())
    return deltas


def assert_streams_like_decode(tokenizer: Any, ids: Sequence[int], rng: random.Random) -> None:
    expected = tokenizer.decode(ids, skip_special_tokens=True)
    for chunks in ([[i] for i in ids], chunk(ids, rng)):
        deltas = stream(tokenizer, chunks)
        assert "".join(deltas) == expected
        if REPLACEMENT_CHAR not in expected:  # the text survived the round trip
            assert not any(REPLACEMENT_CHAR in d for d in deltas)


def make_byte_fallback_tokenizer(model_kind: str) -> PreTrainedTokenizerFast:
    """A Llama-style sentencepiece tokenizer: Metaspace words, 256 ``<0xNN>``
    byte tokens for everything else, and Llama's decoder chain (which strips
    the leading space of the first token)."""
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    words = ["▁", *string.ascii_letters, *string.digits, *".,!?'", "▁the", "▁caf", "▁na", "ve"]
    specials = ["<unk>", "<s>", "</s>"]
    model: Any
    if model_kind == "unigram":
        scores = [(t, 0.0) for t in specials]
        scores += [(t, -10.0) for t in byte_tokens]
        scores += [(w, -1.0) for w in words]
        model = models.Unigram(scores, unk_id=0, byte_fallback=True)
    else:
        vocab = {t: i for i, t in enumerate(specials + byte_tokens + words)}
        model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True)
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


class CountingTokenizer:
    """Wraps a tokenizer and records the longest id list it was asked to decode."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.max_decode_len = 0

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        self.max_decode_len = max(self.max_decode_len, len(ids))
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))


@pytest.fixture(scope="module")
def smollm2_tokenizer(default_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.fixture(scope="module", params=["unigram", "bpe"])
def byte_fallback_tokenizer(request: pytest.FixtureRequest) -> PreTrainedTokenizerFast:
    return make_byte_fallback_tokenizer(request.param)


# --------------------------------------------------------------------------- real tokenizer


@pytest.mark.real_model
@pytest.mark.parametrize("text", TEXTS)
def test_real_tokenizer_streams_like_decode(smollm2_tokenizer: Any, text: str) -> None:
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.decode(ids) == text
    assert_streams_like_decode(smollm2_tokenizer, ids, random.Random(1234))


@pytest.mark.real_model
def test_real_tokenizer_splits_characters_across_tokens(smollm2_tokenizer: Any) -> None:
    # Guards the tests above: they only prove something if some characters
    # really are split across tokens.
    for text in ["你好，世界！这是一个测试。", "🙂🎉👍🏽"]:
        ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
        prefixes = [smollm2_tokenizer.decode(ids[:n]) for n in range(1, len(ids))]
        assert any(p.endswith(REPLACEMENT_CHAR) for p in prefixes)


@pytest.mark.real_model
def test_real_tokenizer_prompt_does_not_change_text(smollm2_tokenizer: Any) -> None:
    prompt_ids = smollm2_tokenizer.encode("Say hi in Chinese: 你", add_special_tokens=False)
    ids = smollm2_tokenizer.encode("你好🙂!", add_special_tokens=False)
    deltas = stream(smollm2_tokenizer, [[i] for i in ids], prompt_ids=prompt_ids)
    assert "".join(deltas) == smollm2_tokenizer.decode(ids, skip_special_tokens=True)


@pytest.mark.real_model
@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_real_tokenizer_special_tokens(smollm2_tokenizer: Any, skip_special_tokens: bool) -> None:
    text = "<|im_start|>assistant\n你好 🙂<|im_end|>\n<|im_start|>user\nok<|im_end|>"
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>") in ids
    deltas = stream(smollm2_tokenizer, [[i] for i in ids], skip_special_tokens=skip_special_tokens)
    assert "".join(deltas) == smollm2_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    assert not any(REPLACEMENT_CHAR in d for d in deltas)


@pytest.mark.real_model
def test_real_tokenizer_flush_returns_incomplete_character(smollm2_tokenizer: Any) -> None:
    # Cut the output after every token: the flushed text completes the decode,
    # U+FFFD included when the cut falls inside a character.
    ids = smollm2_tokenizer.encode("你好🙂 ok", add_special_tokens=False)
    for n in range(1, len(ids) + 1):
        deltas = stream(smollm2_tokenizer, [[i] for i in ids[:n]])
        assert "".join(deltas) == smollm2_tokenizer.decode(ids[:n])
        assert not any(REPLACEMENT_CHAR in d for d in deltas[:-1])


@pytest.mark.real_model
def test_real_tokenizer_cost_per_token_is_bounded(smollm2_tokenizer: Any) -> None:
    counting = CountingTokenizer(smollm2_tokenizer)
    ids = smollm2_tokenizer.encode(" ".join(TEXTS) * 20, add_special_tokens=False)
    assert len(ids) > 1000
    detok = IncrementalDetokenizer(counting, [])
    text = "".join(detok.add([i]) for i in ids) + detok.flush()
    assert text == smollm2_tokenizer.decode(ids)
    assert counting.max_decode_len <= 8


@pytest.mark.real_model
@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40), seed=st.integers(0, 2**16))
def test_real_tokenizer_random_text(smollm2_tokenizer: Any, text: str, seed: int) -> None:
    ids = smollm2_tokenizer.encode(text, add_special_tokens=False)
    assert_streams_like_decode(smollm2_tokenizer, ids, random.Random(seed))


# --------------------------------------------------------------------------- byte fallback


@pytest.mark.parametrize("text", TEXTS)
def test_byte_fallback_streams_like_decode(
    byte_fallback_tokenizer: PreTrainedTokenizerFast, text: str
) -> None:
    ids = byte_fallback_tokenizer.encode(text, add_special_tokens=False)
    tokens = byte_fallback_tokenizer.convert_ids_to_tokens(ids)
    if any(ord(c) > 127 for c in text):
        assert any(t.startswith("<0x") for t in tokens)  # really goes through bytes
    assert_streams_like_decode(byte_fallback_tokenizer, ids, random.Random(99))


def test_byte_fallback_holds_partial_character(
    byte_fallback_tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = byte_fallback_tokenizer.encode("the 你", add_special_tokens=False)
    tokens = byte_fallback_tokenizer.convert_ids_to_tokens(ids)
    assert tokens[-3:] == ["<0xE4>", "<0xBD>", "<0xA0>"]
    detok = IncrementalDetokenizer(byte_fallback_tokenizer, [])
    assert detok.add(ids[:-3]) == "the "
    assert detok.add(ids[-3:-2]) == ""
    assert detok.add(ids[-2:-1]) == ""
    assert detok.num_pending_tokens == 2
    assert detok.add(ids[-1:]) == "你"
    assert detok.flush() == ""


def test_byte_fallback_flush_at_truncated_output(
    byte_fallback_tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = byte_fallback_tokenizer.encode("café 🙂", add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_fallback_tokenizer, [])
    text = "".join(detok.add([i]) for i in ids[:-1])
    assert REPLACEMENT_CHAR not in text
    text += detok.flush()
    assert text == byte_fallback_tokenizer.decode(ids[:-1])
    assert text.endswith(REPLACEMENT_CHAR)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=30), seed=st.integers(0, 2**16))
def test_byte_fallback_random_text(text: str, seed: int) -> None:
    tokenizer = make_byte_fallback_tokenizer("unigram" if seed % 2 else "bpe")
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert_streams_like_decode(tokenizer, ids, random.Random(seed))


@pytest.mark.real_model
@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(st.integers(3, 700), max_size=30),
    seed=st.integers(0, 2**16),
)
def test_real_tokenizer_arbitrary_ids(smollm2_tokenizer: Any, ids: list[int], seed: int) -> None:
    # Arbitrary ids include stray and invalid UTF-8 bytes (the low ids are the
    # single-byte tokens); U+FFFD that no later token can complete is emitted.
    chunks = chunk(ids, random.Random(seed))
    deltas = stream(smollm2_tokenizer, chunks)
    assert "".join(deltas) == smollm2_tokenizer.decode(ids, skip_special_tokens=True)

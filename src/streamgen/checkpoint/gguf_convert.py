"""Convert a GGUF file (``llama``, ``qwen2`` or ``qwen3``) into a Hugging Face checkpoint
directory; write the config and tokenizer of any served GGUF file.

The output directory holds ``config.json``, ``generation_config.json``, the
tokenizer files and a float32 ``model.safetensors``, laid out as
``transformers.LlamaForCausalLM`` (``Qwen2ForCausalLM``) expects them.

Invariants:

* Weights are dequantized here, with ``gguf.quants.dequantize``; transformers'
  own GGUF weight loader is never used, so it can serve tests as an
  independent reference.
* ``GGUFReader`` reports ggml shapes (fastest axis first); a dequantized
  array comes out in numpy order, which for a linear layer is
  ``[out_features, in_features]``, the reverse of the ggml shape. Any other
  shape is rejected.
* llama.cpp stores a ``llama`` file's Q and K projections with rows permuted for its
  rotary-embedding layout (pairs interleaved within each head); HF expects
  the two halves of each head contiguous. :func:`unpermute_rotary_rows`
  undoes the permutation exactly.
* Embeddings are tied exactly when the file has no ``output.weight``; the
  tied ``lm_head.weight`` is then not written.
* The tokenizer gets the pre-tokenizer llama.cpp would apply for the file's
  ``tokenizer.ggml.pre`` (transformers' GGUF import drops it).
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize
from tokenizers import normalizers, pre_tokenizers
from tqdm import tqdm

from streamgen.checkpoint.gguf_architectures import GGUFArchitecture, gguf_architecture
from streamgen.checkpoint.gguf_file import GGUFFile, read_gguf_file
from streamgen.errors import ModelLoadError, UnsupportedModelError

logger = logging.getLogger(__name__)

# llama.cpp tensor name -> HF name, for tensors outside the decoder layers.
_GLOBAL_TENSOR_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# llama.cpp per-layer tensor name -> HF name under ``model.layers.N.``.
_LAYER_TENSOR_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",  # Qwen3's per-head norms
    "attn_k_norm": "self_attn.k_norm",
}
# The architectures whose files convert to HF checkpoints: the Llama tensor layout of the
# names above. The others are served from the file itself (gguf_model.py).
CONVERTIBLE = frozenset({"llama", "qwen2", "qwen3"})
# Derived from the config's rope scaling by transformers; nothing to store.
_SKIPPED_TENSORS = frozenset({"rope_freqs.weight"})
_LAYER_TENSOR_PATTERN = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
_GLOBAL_TENSOR_PATTERN = re.compile(r"^([a-z_]+)\.(weight|bias)$")

# llama.cpp pre-tokenizer types that split every digit off first, then apply
# the GPT-2 regex (llama-vocab.cpp puts these in one ``case`` block).
_DIGITS_THEN_GPT2_PRE_TYPES = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)
# Types using the GPT-2 regex alone: transformers' ByteLevel default is right.
_GPT2_PRE_TYPES = frozenset({"default", "gpt2", "mpt", "olmo", "jais"})


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path, *, progress: bool = True) -> None:
    """Write an HF-style checkpoint for ``gguf_path`` into ``out_dir``.

    Args:
        gguf_path: a GGUF file of an architecture in ``GGUF_ARCHITECTURES``.
        out_dir: target directory (created if needed); existing files with
            the same names are overwritten.
        progress: show step messages and a per-tensor progress bar on stderr.

    Raises:
        UnsupportedModelError: an architecture streamgen does not serve, or a
            tensor or quantization type this converter does not know.
        ModelLoadError: the file cannot be read or is inconsistent.

    Example:
        >>> from pathlib import Path
        >>> gguf_file = Path("SmolLM2-135M-Instruct.Q4_1.gguf")
        >>> convert_gguf_to_hf(gguf_file, Path("smollm2"))  # doctest: +SKIP
    """
    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    reader = open_gguf(gguf_path)
    architecture = _metadata_value(reader, "general.architecture")
    if architecture not in CONVERTIBLE:
        raise UnsupportedModelError(
            f"{gguf_path.name}: converting {architecture!r} files to HF checkpoints is not "
            f"supported (only {sorted(CONVERTIBLE)}); serve the file itself"
        )
    _say(progress, f"converting {gguf_path.name}: config and tokenizer")
    write_config_and_tokenizer(gguf_path, read_gguf_file(gguf_path), out_dir)
    num_heads, num_kv_heads = head_counts(reader)
    arch = gguf_architecture(_metadata_value(reader, "general.architecture"), gguf_path.name)
    if not arch.rotary_rows_permuted:
        num_heads = num_kv_heads = 0  # nothing to unpermute
    tensors = _dequantize_all(reader, num_heads, num_kv_heads, progress=progress)
    _say(progress, f"writing {out_dir / 'model.safetensors'}")
    _write_safetensors(tensors, out_dir / "model.safetensors")


def open_gguf(gguf_path: Path) -> GGUFReader:
    """The file's reader (memory-mapped), checked to be a supported architecture.

    Raises:
        ModelLoadError: not a readable GGUF file.
        UnsupportedModelError: an architecture streamgen does not serve.
    """
    try:
        reader = GGUFReader(gguf_path)
    except (OSError, ValueError, IndexError, KeyError) as err:
        raise ModelLoadError(f"cannot read GGUF file {gguf_path}: {err}") from err
    gguf_architecture(_metadata_value(reader, "general.architecture"), gguf_path.name)
    return reader


def write_config_and_tokenizer(gguf_path: Path, header: GGUFFile, out_dir: Path) -> None:
    """``config.json``, ``generation_config.json`` and the tokenizer files of the GGUF's
    metadata (``header``: the file's, already read and checked) into ``out_dir`` (the
    tokenizer with llama.cpp's pre-tokenizer restored)."""
    architecture = header.metadata.get("general.architecture")
    arch = gguf_architecture(architecture, gguf_path.name)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_config(gguf_path, header, out_dir, arch)
    _write_tokenizer(
        gguf_path,
        out_dir,
        pre_type=header.metadata.get("tokenizer.ggml.pre"),
        max_length=header.metadata.get(f"{architecture}.context_length"),
        by_architecture=arch.tokenizer_by_architecture,
        sentencepiece_prefix=(
            bool(header.metadata.get("tokenizer.ggml.add_space_prefix", True))
            if header.metadata.get("tokenizer.ggml.model") == "llama"
            else None
        ),
    )


def head_counts(reader: GGUFReader) -> tuple[int, int]:
    """(attention heads, key/value heads) from the metadata."""
    architecture = _metadata_value(reader, "general.architecture")
    num_heads = int(_required_metadata(reader, f"{architecture}.attention.head_count"))
    num_kv_heads = int(
        _metadata_value(reader, f"{architecture}.attention.head_count_kv") or num_heads
    )
    return num_heads, num_kv_heads


def hf_tensor_name(gguf_name: str) -> str:
    """Map a llama.cpp tensor name to its HF Llama name.

    Example:
        >>> hf_tensor_name("blk.3.attn_output.weight")
        'model.layers.3.self_attn.o_proj.weight'

    Raises:
        UnsupportedModelError: the name is not part of the llama layout.
    """
    layer_match = _LAYER_TENSOR_PATTERN.match(gguf_name)
    if layer_match is not None:
        layer, stem, suffix = layer_match.groups()
        if stem in _LAYER_TENSOR_NAMES:
            return f"model.layers.{int(layer)}.{_LAYER_TENSOR_NAMES[stem]}.{suffix}"
    global_match = _GLOBAL_TENSOR_PATTERN.match(gguf_name)
    if global_match is not None:
        stem, suffix = global_match.groups()
        if stem in _GLOBAL_TENSOR_NAMES:
            return f"{_GLOBAL_TENSOR_NAMES[stem]}.{suffix}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no llama counterpart")


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of a Q or K projection.

    llama.cpp's converter applied, with ``rows = weight.shape[0]``::

        w.reshape(num_heads, 2, rows // num_heads // 2, *rest).swapaxes(1, 2).reshape(w.shape)

    which interleaves the two rotary halves of each head; this is its inverse.

    Args:
        weight: ``[num_heads * head_dim, in_features]`` (or a 1-D bias).
        num_heads: attention heads for Q, key/value heads for K.

    Returns:
        An array of the same shape with each head's halves contiguous again.
    """
    num_rows = weight.shape[0]
    if num_rows % (2 * num_heads) != 0:
        raise ModelLoadError(
            f"cannot unpermute {num_rows} rows into {num_heads} heads of even size"
        )
    rest = weight.shape[1:]
    return (
        weight.reshape(num_heads, num_rows // num_heads // 2, 2, *rest)
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def llama_cpp_pre_tokenizer(pre_type: str | None) -> pre_tokenizers.PreTokenizer | None:
    """Return the HF pre-tokenizer matching llama.cpp's ``tokenizer.ggml.pre``.

    ``None`` means transformers' default (byte-level GPT-2 regex) is already
    right, or the type is unknown (a warning is logged then).
    """
    if pre_type is None or pre_type in _GPT2_PRE_TYPES or pre_type in _transformers_splits():
        return None
    if pre_type in _DIGITS_THEN_GPT2_PRE_TYPES:
        # llama.cpp: regex \p{N} (each digit alone), then the GPT-2 regex.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    logger.warning(
        "GGUF pre-tokenizer %r is not known to streamgen; keeping transformers' default, "
        "tokenization may differ from llama.cpp",
        pre_type,
    )
    return None


def sentencepiece_normalizer(add_space_prefix: bool) -> normalizers.Normalizer:
    """llama.cpp's whitespace rule for a sentencepiece vocabulary (``tokenizer.ggml.model``
    "llama"), which is sentencepiece's own: every space becomes "\u2581", and with
    ``add_space_prefix`` every run of text between special tokens gets one "\u2581" in
    front, whatever it starts with. (The ``Metaspace`` pre-tokenizer transformers builds
    for Llama adds it to the first run only, and not to text that already starts with a
    space: "  hi" would lose a space against the model's own tokenizer.)

    Example:
        >>> sentencepiece_normalizer(True).normalize_str("  hi")
        '\u2581\u2581\u2581hi'
    """
    replace = normalizers.Replace(pattern=" ", content="\u2581")
    if not add_space_prefix:
        return replace
    return normalizers.Sequence([normalizers.Prepend(prepend="\u2581"), replace])


def _transformers_splits() -> frozenset[str]:
    """The pre-tokenizer types transformers' GGUF import restores itself (qwen2, llama3,
    ...: a split regex before byte-level BPE)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
        )
    except ImportError:  # an older transformers: keep its default, with the warning
        return frozenset()
    return frozenset(GGUF_PRE_TOKENIZER_SPLITS)


def _dequantize_all(
    reader: GGUFReader, num_heads: int, num_kv_heads: int, *, progress: bool
) -> dict[str, np.ndarray]:
    """Dequantize every tensor to float32 under its HF name."""
    tensors: dict[str, np.ndarray] = {}
    for tensor in tqdm(
        reader.tensors, desc="dequantizing", unit="tensor", file=sys.stderr, disable=not progress
    ):
        if tensor.name in _SKIPPED_TENSORS:
            continue
        name = hf_tensor_name(tensor.name)
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise UnsupportedModelError(
                f"tensor {tensor.name}: quantization {tensor.tensor_type.name} is not supported"
            ) from err
        expected_shape = tuple(int(dim) for dim in reversed(tensor.shape))
        if values.shape != expected_shape:
            raise ModelLoadError(
                f"tensor {tensor.name} dequantized to {values.shape}, expected {expected_shape}"
            )
        # [out_features, in_features] from here on.
        values = np.ascontiguousarray(values, dtype=np.float32)
        if ".self_attn.q_proj." in name and num_heads:
            values = unpermute_rotary_rows(values, num_heads)
        elif ".self_attn.k_proj." in name and num_kv_heads:
            values = unpermute_rotary_rows(values, num_kv_heads)
        tensors[name] = np.ascontiguousarray(values)
    if "model.embed_tokens.weight" not in tensors:
        raise ModelLoadError("GGUF file has no token_embd.weight")
    return tensors


@contextlib.contextmanager
def _alone(gguf_path: Path) -> Iterator[tuple[str, str]]:
    """The GGUF in a directory of its own (a link): transformers also reads the config
    and tokenizer files beside a GGUF, and a converted checkpoint in the same directory
    changes what it builds."""
    with tempfile.TemporaryDirectory(prefix="streamgen-gguf-") as directory:
        link = Path(directory) / gguf_path.name
        link.symlink_to(gguf_path.resolve())
        yield directory, link.name


def _write_config(
    gguf_path: Path, header: GGUFFile, out_dir: Path, arch: GGUFArchitecture
) -> None:
    """Write ``config.json`` and ``generation_config.json`` from the GGUF metadata, by
    streamgen's table (gguf_config.py): no output.weight means tied embeddings."""
    from transformers import AutoConfig, GenerationConfig

    from streamgen.checkpoint.gguf_config import config_fields

    name = header.metadata["general.architecture"]
    for key in arch.refused_keys:
        if f"{name}.{key}" in header.metadata:
            raise UnsupportedModelError(
                f"{gguf_path.name}: {name}.{key} is set: a layout streamgen does not serve"
            )
    embed = header.tensors.get("token_embd.weight")
    if embed is None:
        raise ModelLoadError(f"{gguf_path.name}: tensor token_embd.weight is missing")

    def read_tensor(tensor: str) -> np.ndarray | None:
        info = header.tensors.get(tensor)
        if info is None:
            return None
        if info.type_name != "F32":
            raise ModelLoadError(f"{gguf_path.name}: tensor {tensor} is {info.type_name}, not F32")
        return np.frombuffer(header.array(tensor), dtype=np.float32).copy()

    fields = config_fields(
        name, header.metadata, keys=arch.config_keys, fixed=arch.config_fixed,
        derive=arch.derive, vocab_size=int(embed.shape[-1]),
        tied="output.weight" not in header.tensors, read_tensor=read_tensor,
    )  # fmt: skip
    try:
        config = AutoConfig.for_model(arch.model_type, **fields)
    except (TypeError, ValueError) as err:
        raise ModelLoadError(f"{gguf_path.name}: its metadata make no valid config: {err}") from err
    config.architectures = [arch.hf_class]
    config.save_pretrained(out_dir)
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=getattr(config, "pad_token_id", None),
    )
    generation.save_pretrained(out_dir)


def _write_tokenizer(
    gguf_path: Path,
    out_dir: Path,
    *,
    pre_type: str | None,
    max_length: int | None,
    by_architecture: bool,
    sentencepiece_prefix: bool | None,
) -> None:
    """Write the tokenizer files, with llama.cpp's pre-tokenizer restored
    (``by_architecture``: transformers' GGUF import knows the architecture and picks the
    tokenizer class; else the generic fast tokenizer of the file's vocabulary), and for a
    sentencepiece vocabulary (``sentencepiece_prefix`` not None: its
    ``add_space_prefix``) llama.cpp's whitespace rule."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    loader = AutoTokenizer if by_architecture else PreTrainedTokenizerFast
    with _alone(gguf_path) as (directory, name):
        tokenizer = loader.from_pretrained(directory, gguf_file=name)
    if max_length:
        tokenizer.model_max_length = int(max_length)
    pre_tokenizer = llama_cpp_pre_tokenizer(pre_type)
    if pre_tokenizer is not None:
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizer
    if sentencepiece_prefix is not None:
        tokenizer.backend_tokenizer.normalizer = sentencepiece_normalizer(sentencepiece_prefix)
        tokenizer.backend_tokenizer.pre_tokenizer = None
    if not getattr(tokenizer, "chat_template", None):
        logger.warning("GGUF file %s has no chat template", gguf_path.name)
    tokenizer.save_pretrained(out_dir)


def _write_safetensors(tensors: dict[str, np.ndarray], path: Path) -> None:
    """Save float32 tensors in the layout ``transformers`` loads (format "pt")."""
    from safetensors.numpy import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _metadata_value(reader: GGUFReader, key: str) -> Any:
    """Return a scalar or string metadata value, or ``None`` when absent."""
    field = reader.get_field(key)
    if field is None:
        return None
    value_type = field.types[0]
    if value_type == GGUFValueType.ARRAY:
        raise ModelLoadError(f"GGUF metadata {key} is an array, expected a scalar")
    part = field.parts[field.data[0]]
    if value_type == GGUFValueType.STRING:
        return bytes(part).decode("utf-8")
    return part[0].item()


def _required_metadata(reader: GGUFReader, key: str) -> Any:
    value = _metadata_value(reader, key)
    if value is None:
        raise ModelLoadError(f"GGUF metadata {key} is missing")
    return value


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"streamgen: {message}", file=sys.stderr, flush=True)

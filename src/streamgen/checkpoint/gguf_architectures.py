"""The GGUF architectures streamgen serves, one table row each (no heavy imports).

A GGUF file names its architecture in ``general.architecture`` and prefixes its
hyperparameters with it (``qwen2.block_count``). What differs between the rows is what
llama.cpp's converter did to the HF checkpoint:

* ``llama`` (also Mistral, SmolLM2 and other Llama-layout models, which llama.cpp writes
  as ``llama``): Q and K rows permuted for llama.cpp's interleaved rotary layout
  (undone at load);
* ``qwen2``: rotary halves left as HF has them (llama.cpp's NEOX rope), Q/K/V biases
  stored as ``blk.N.attn_{q,k,v}.bias``;
* ``qwen3``: as qwen2 without biases, plus per-head q / k norms
  (``blk.N.attn_{q,k}_norm``) and a head size of its own (``qwen3.attention.key_length``:
  Qwen3-0.6B has 16 heads of 128 over a hidden size of 1024).
"""

from __future__ import annotations

from dataclasses import dataclass

from streamgen.errors import UnsupportedModelError


@dataclass(frozen=True, slots=True)
class GGUFArchitecture:
    """How one ``general.architecture`` maps onto an HF config and streamgen's weights."""

    model_type: str  # HF config model_type
    hf_class: str  # HF config architectures[0]
    rotary_rows_permuted: bool  # Q/K rows in llama.cpp's interleaved order
    qk_norm: bool = False  # blk.N.attn_{q,k}_norm: per-head q / k norms (Qwen3)


GGUF_ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", "LlamaForCausalLM", rotary_rows_permuted=True),
    "qwen2": GGUFArchitecture("qwen2", "Qwen2ForCausalLM", rotary_rows_permuted=False),
    "qwen3": GGUFArchitecture(
        "qwen3", "Qwen3ForCausalLM", rotary_rows_permuted=False, qk_norm=True
    ),
}


def gguf_architecture(name: object, file_name: str) -> GGUFArchitecture:
    """The row for ``name``, or :class:`UnsupportedModelError` naming the supported ones."""
    if not isinstance(name, str) or name not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{file_name}: architecture {name!r} is not supported "
            f"(supported: {sorted(GGUF_ARCHITECTURES)})"
        )
    return GGUF_ARCHITECTURES[name]

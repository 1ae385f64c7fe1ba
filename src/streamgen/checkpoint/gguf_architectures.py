"""The GGUF architectures streamgen serves, one table row each (no heavy imports).

A GGUF file names its architecture in ``general.architecture`` and prefixes its
hyperparameters with it (``qwen2.block_count``). What differs between the rows is what
llama.cpp's converter did to the HF checkpoint, and what llama.cpp infers when it reads
the file back (the config: ``gguf_config.py``):

* ``llama`` (also Mistral, SmolLM2 and other Llama-layout models, which llama.cpp writes
  as ``llama``) and ``granite``: Q and K rows permuted for llama.cpp's interleaved rotary
  layout (undone at load); Granite's multipliers as ``granite.*_scale`` keys;
* ``qwen2``: rotary halves left as HF has them (llama.cpp's NEOX rope), Q/K/V biases
  stored as ``blk.N.attn_{q,k,v}.bias``;
* ``qwen3``: as qwen2 without biases, plus per-head q / k norms
  (``blk.N.attn_{q,k}_norm``) and a head size of its own (``qwen3.attention.key_length``:
  Qwen3-0.6B has 16 heads of 128 over a hidden size of 1024);
* ``olmo2``: q / k norms over the whole projection, norms on each branch's output
  (``post_attention_norm``, ``post_ffw_norm``);
* ``phi3``: q/k/v fused in ``attn_qkv`` and gate/up in ``ffn_up``; long-context rope
  factors as tensors;
* ``gemma2`` / ``gemma3``: four norms a layer, stored as ``1 + w`` (the converter adds
  the 1: served as stored); sliding layers, query scale and local rope base by
  llama.cpp's rules.

The per-model differences once loaded (norm placement, q/k norms, fused projections)
come from the HF model type's row in ``streamgen.model.config.ARCHITECTURES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from streamgen.checkpoint.gguf_config import Derive, derive_gemma2, derive_gemma3, derive_phi3
from streamgen.errors import UnsupportedModelError


@dataclass(frozen=True, slots=True)
class GGUFArchitecture:
    """How one ``general.architecture`` maps onto an HF config and streamgen's weights."""

    model_type: str  # HF config model_type
    hf_class: str  # HF config architectures[0]
    rotary_rows_permuted: bool  # Q/K rows in llama.cpp's interleaved order
    # "{arch}.<key>" -> HF config field, beyond gguf_config.COMMON_KEYS
    config_keys: Mapping[str, str] = field(default_factory=dict)
    config_fixed: Mapping[str, Any] = field(default_factory=dict)  # fields set outright
    derive: Derive | None = None  # fields llama.cpp infers (gguf_config.py)
    # keys of a layout streamgen does not serve under this name (OLMo 3's windows)
    refused_keys: tuple[str, ...] = ()
    # The tokenizer's class from transformers' GGUF import of the architecture (it knows
    # llama, qwen2, qwen3, phi3); else the generic fast tokenizer of the file's vocabulary
    # (its sentencepiece builder is still chosen by architecture: Gemma's, ...), whose
    # special tokens are the file's alone.
    tokenizer_by_architecture: bool = True


GEMMA_KEYS = {"attention.sliding_window": "sliding_window",
              "final_logit_softcapping": "final_logit_softcapping"}  # fmt: skip
GGUF_ARCHITECTURES = {
    "llama": GGUFArchitecture("llama", "LlamaForCausalLM", rotary_rows_permuted=True),
    "qwen2": GGUFArchitecture("qwen2", "Qwen2ForCausalLM", rotary_rows_permuted=False),
    "qwen3": GGUFArchitecture("qwen3", "Qwen3ForCausalLM", rotary_rows_permuted=False),
    "granite": GGUFArchitecture(
        "granite", "GraniteForCausalLM", rotary_rows_permuted=True,
        config_keys={"attention.scale": "attention_multiplier",
                     "embedding_scale": "embedding_multiplier",
                     "residual_scale": "residual_multiplier", "logit_scale": "logits_scaling"},
        tokenizer_by_architecture=False,
    ),
    "olmo2": GGUFArchitecture(
        "olmo2", "Olmo2ForCausalLM", rotary_rows_permuted=False,
        refused_keys=("attention.sliding_window",), tokenizer_by_architecture=False,
    ),
    "phi3": GGUFArchitecture(
        "phi3", "Phi3ForCausalLM", rotary_rows_permuted=False,
        config_keys={"attention.sliding_window": "sliding_window"}, derive=derive_phi3,
    ),
    "gemma2": GGUFArchitecture(
        "gemma2", "Gemma2ForCausalLM", rotary_rows_permuted=False,
        config_keys={**GEMMA_KEYS, "attn_logit_softcapping": "attn_logit_softcapping"},
        config_fixed={"hidden_activation": "gelu_pytorch_tanh"}, derive=derive_gemma2,
        tokenizer_by_architecture=False,
    ),
    "gemma3": GGUFArchitecture(
        "gemma3_text", "Gemma3ForCausalLM", rotary_rows_permuted=False,
        config_keys=GEMMA_KEYS, config_fixed={"hidden_activation": "gelu_pytorch_tanh"},
        derive=derive_gemma3, tokenizer_by_architecture=False,
    ),
}  # fmt: skip


def gguf_architecture(name: object, file_name: str) -> GGUFArchitecture:
    """The row for ``name``, or :class:`UnsupportedModelError` naming the supported ones."""
    if not isinstance(name, str) or name not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{file_name}: architecture {name!r} is not supported "
            f"(supported: {sorted(GGUF_ARCHITECTURES)})"
        )
    return GGUF_ARCHITECTURES[name]

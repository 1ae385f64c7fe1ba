"""Builders of real objects for tests: tiny random HF checkpoints and batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def tiny_hf_config(model_type: str = "llama", **overrides: Any) -> Any:
    """A small random-weight config of the given family (GQA by default)."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GraniteConfig,
        LlamaConfig,
        MistralConfig,
        Olmo2Config,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    common: dict[str, Any] = dict(
        vocab_size=211,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    common.update(overrides)
    classes = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig,
               "qwen3": Qwen3Config, "granite": GraniteConfig, "olmo2": Olmo2Config,
               "phi3": Phi3Config, "gemma3_text": Gemma3TextConfig,
               "gemma2": Gemma2Config}  # fmt: skip
    cls = classes[model_type]
    return cls(**common)


def make_hf_checkpoint(path: Path, config: Any, seed: int = 0) -> Any:
    """Save a random-weight HF model (safetensors) to ``path`` and return the model.

    Weights are drawn larger than HF's default init, and norms away from 1, so
    that logits are far from uniform and a wrong op shows up in the diff.
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model = model.to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.copy_(torch.randn_like(param) * 0.15)
    model.save_pretrained(path, safe_serialization=True)
    return model

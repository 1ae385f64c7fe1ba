"""Bad checkpoints fail with typed errors that name the problem."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import make_hf_checkpoint, tiny_hf_config
from safetensors.torch import load_file, save_file

from streamgen.checkpoint.loader import load_model
from streamgen.errors import ConfigError, MissingTensorError, ModelLoadError, UnsupportedModelError


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        load_model(tmp_path, load_tokenizer=False)


@pytest.mark.parametrize(
    ("model_type", "tensor"),
    [
        ("llama", "model.layers.1.mlp.up_proj.weight"),
        ("qwen2", "model.layers.0.self_attn.k_proj.bias"),
    ],
)
def test_missing_tensor_is_named(tmp_path: Path, model_type: str, tensor: str) -> None:
    make_hf_checkpoint(tmp_path, tiny_hf_config(model_type))
    weights = load_file(tmp_path / "model.safetensors")
    del weights[tensor]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(MissingTensorError, match=re.escape(tensor)):
        load_model(tmp_path, load_tokenizer=False)


def test_unsupported_rope_scaling_is_named(tmp_path: Path) -> None:
    make_hf_checkpoint(tmp_path, tiny_hf_config("llama"))
    config = json.loads((tmp_path / "config.json").read_text())
    params = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
              "original_max_position_embeddings": 64}
    config["rope_parameters"] = config["rope_scaling"] = params
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="yarn"):
        load_model(tmp_path, load_tokenizer=False)


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    tiny_hf_config("llama").save_pretrained(tmp_path)
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors only"):
        load_model(tmp_path, load_tokenizer=False)


def test_not_a_checkpoint_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path, load_tokenizer=False)


def test_bad_dtype(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="int8"):
        load_model(tmp_path, dtype="int8", load_tokenizer=False)

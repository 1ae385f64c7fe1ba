"""Load a Llama-family HF checkpoint directory into streamgen's own model.

Config and tokenizer come from transformers (``AutoConfig``,
``AutoTokenizer``, so chat templates work as users expect); weights come from
safetensors and are fused into streamgen's layout (``qkv_proj``,
``gate_up_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamgen.checkpoint.safetensors_dir import CheckpointTensors
from streamgen.errors import ConfigError, ModelLoadError
from streamgen.model.config import ARCHITECTURES, ModelSpec
from streamgen.model.linear import Linear, column_splits, upcast_min_rows
from streamgen.model.llama import LlamaModel
from streamgen.model.native_decode import NativeDecoder
from streamgen.native import native_kernels

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32" | "bfloat16" | "float16"`` (or the torch dtype) -> torch dtype."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"unsupported dtype {dtype!r}; use float32, bfloat16 or float16")


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to run: its spec, weights and tokenizer."""

    path: Path
    spec: ModelSpec
    model: LlamaModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.model.norm.weight.device

    @property
    def quantized(self) -> bool:
        """Whether the linear layers hold packed quantized weights (the int8 kernels)."""
        return any(getattr(m, "packed", None) is not None for m in self.model.modules())


def load_model(
    path: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    load_tokenizer: bool = True,
    quantization: str | None = "auto",
    threads: int | None = None,
    activation_bits: int = 8,
) -> LoadedModel:
    """Load a checkpoint directory or a GGUF file (``None``: the default SmolLM2-135M-Instruct,
    from its GGUF on the quantized path, or its dense checkpoint with ``quantization=None``).

    ``quantization``: ``"auto"`` keeps a GGUF file's own types and a directory's dense
    weights; ``"gguf"`` asks for a GGUF file; ``None`` serves dense weights in ``dtype``
    (a GGUF is dequantized exactly); ``"q8_0"``, ``"q4_0"``, ... quantize a dense
    checkpoint at load. Quantized models compute in float32 on the CPU, with
    ``threads`` kernel threads (default: every CPU this process may use), with int8
    activations (``activation_bits=8``, llama.cpp's arithmetic) or two int8 roundings
    (16: about 20% slower at batch 1, as close to the dense model as fp32 rounding).

    >>> loaded = load_model(dtype="bfloat16")  # doctest: +SKIP
    >>> loaded.spec.num_layers
    30
    >>> quantized = load_model("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    """
    from streamgen.checkpoint.gguf_model import is_gguf_file
    from streamgen.checkpoint.quantization import check_quantization

    check_quantization(quantization, activation_bits)
    torch_dtype = resolve_dtype(dtype)
    torch_device = torch.device(device)
    if path is None and quantization in ("auto", "gguf"):
        from streamgen.checkpoint import default_gguf_path

        path = default_gguf_path()
    if path is not None and is_gguf_file(path):
        return _load_gguf(
            Path(path).expanduser(),
            quantization,
            torch_dtype,
            torch_device,
            load_tokenizer,
            threads,
            activation_bits,
        )
    if quantization == "gguf":
        raise ConfigError(f"quantization='gguf' needs a .gguf file, got {path!r}")
    checkpoint_dir = _resolve_path(path)
    hf_config = _load_hf_config(checkpoint_dir)
    spec = ModelSpec.from_hf_config(hf_config)
    if quantization in (None, "auto"):
        model = _build_model(spec, checkpoint_dir, torch_dtype, torch_device)
    else:
        model = _quantize_at_load(
            spec, checkpoint_dir, quantization, torch_device, threads, activation_bits
        )
        torch_dtype = torch.float32
    tokenizer = _load_tokenizer(checkpoint_dir) if load_tokenizer else None
    return LoadedModel(checkpoint_dir, spec, model, tokenizer, torch_dtype)


def _quantized_context(device: torch.device, threads: int | None) -> Any:
    from streamgen.native.build import NativeUnavailableError
    from streamgen.native.qkernels import QuantContext

    if device.type != "cpu":
        raise ConfigError(f"quantized weights run on the CPU, not {device}")
    try:
        return QuantContext.create(threads=threads)
    except NativeUnavailableError as exc:
        raise ConfigError(f"quantized weights need the native CPU kernels: {exc}") from exc


def _load_gguf(
    path: Path,
    quantization: str | None,
    dtype: torch.dtype,
    device: torch.device,
    load_tokenizer: bool,
    threads: int | None,
    activation_bits: int,
) -> LoadedModel:
    from streamgen.checkpoint.gguf_model import read_gguf
    from streamgen.checkpoint.quantized_model import build_quantized_model

    if quantization not in ("auto", "gguf", None):
        raise ConfigError(
            f"quantization={quantization!r} re-quantizes a dense checkpoint; a GGUF file "
            "is served in its own types ('gguf') or dense (None)"
        )
    dense = quantization is None  # the same values, dequantized exactly, in `dtype`
    ckpt = read_gguf(path, dense=dense)
    spec = ModelSpec.from_hf_config(_load_hf_config(ckpt.metadata_dir))
    if dense:
        state = {f"{name}.weight": w for name, w in ckpt.weights.items()}
        state |= {f"{name}.bias": b for name, b in ckpt.biases.items()}
        model = _dense_model(spec, state, dtype, device)  # type: ignore[arg-type]
    else:
        ctx = _quantized_context(device, threads)
        kernels = native_kernels()
        model = build_quantized_model(
            spec, ckpt.weights, ckpt.biases, ctx, kernels, activation_bits=activation_bits
        )
        _finish(model, spec, kernels, device)
        dtype = torch.float32
    tokenizer = _load_tokenizer(ckpt.metadata_dir) if load_tokenizer else None
    return LoadedModel(path, spec, model, tokenizer, dtype)


def _quantize_at_load(
    spec: ModelSpec,
    checkpoint_dir: Path,
    scheme: str,
    device: torch.device,
    threads: int | None,
    activation_bits: int,
) -> LlamaModel:
    from streamgen.checkpoint.quantized_model import build_quantized_model, quantize_state

    ctx = _quantized_context(device, threads)
    with CheckpointTensors.open(checkpoint_dir) as tensors:
        state = _fused_state_dict(spec, tensors, torch.float32, torch.device("cpu"))
    biases = {key[: -len(".bias")]: value for key, value in state.items() if key.endswith(".bias")}
    weights = quantize_state(state, spec, scheme, ctx)
    kernels = native_kernels()
    model = build_quantized_model(
        spec, weights, biases, ctx, kernels, activation_bits=activation_bits
    )
    _finish(model, spec, kernels, device)
    return model


def _finish(model: LlamaModel, spec: ModelSpec, kernels: Any, device: torch.device) -> None:
    model.native_decoder = NativeDecoder.for_model(model, kernels)
    model.init_rope(device)
    model.eval()
    model.requires_grad_(False)


def _resolve_path(path: str | Path | None) -> Path:
    if path is None:
        from streamgen.checkpoint import default_model_path

        return default_model_path()
    checkpoint_dir = Path(path).expanduser()
    if not (checkpoint_dir / "config.json").is_file():
        raise ModelLoadError(f"{checkpoint_dir} is not a checkpoint directory (no config.json)")
    return checkpoint_dir


def _load_hf_config(checkpoint_dir: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(checkpoint_dir, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"cannot read config of {checkpoint_dir}: {exc}") from exc


def _load_tokenizer(checkpoint_dir: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True)
    except (ValueError, KeyError, OSError) as exc:
        raise ModelLoadError(f"cannot load tokenizer of {checkpoint_dir}: {exc}") from exc


def _build_model(
    spec: ModelSpec, checkpoint_dir: Path, dtype: torch.dtype, device: torch.device
) -> LlamaModel:
    with CheckpointTensors.open(checkpoint_dir) as tensors:
        state = _fused_state_dict(spec, tensors, dtype, device)
    return _dense_model(spec, state, dtype, device)


def _dense_model(
    spec: ModelSpec, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device
) -> LlamaModel:
    """The runtime model over a fused dense state dict (``layers.0.self_attn.qkv_proj.weight``,
    ...), in each device's weight layout."""
    state = {name: t.to(device=device, dtype=dtype) for name, t in state.items()}
    with torch.device("meta"):
        model = LlamaModel(spec)
    if spec.tie_word_embeddings:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    threads = torch.get_num_threads()
    # With the native kernels, small steps (where the layout matters) run natively
    # on [out, in] weights; without them, wide fp32 layers get column slabs.
    kernels = native_kernels() if device.type == "cpu" else None
    for module in model.modules():
        if isinstance(module, Linear):
            out_features, in_features = module.weight.shape
            splits = (
                None
                if kernels is not None
                else column_splits(out_features, in_features, dtype, device, threads)
            )
            module.set_weight(module.weight, splits, upcast_min_rows(dtype, device))
            module.enable_native(kernels)
    _finish(model, spec, kernels, device)
    return model


def _fused_state_dict(
    spec: ModelSpec, tensors: CheckpointTensors, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    def get(name: str) -> torch.Tensor:
        return tensors.get(name).to(device=device, dtype=dtype)

    state = {
        "embed_tokens.weight": get("model.embed_tokens.weight"),
        "norm.weight": get("model.norm.weight"),
    }
    if not spec.tie_word_embeddings:
        state["lm_head.weight"] = get("lm_head.weight")
    for i in range(spec.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = src + "self_attn."
        if spec.fused_projections:  # Phi-3: stored fused, in our order
            state[dst + "self_attn.qkv_proj.weight"] = get(attn + "qkv_proj.weight")
        else:
            state[dst + "self_attn.qkv_proj.weight"] = torch.cat(
                [get(attn + f"{p}_proj.weight") for p in "qkv"]
            )
        if spec.qkv_bias:
            state[dst + "self_attn.qkv_proj.bias"] = torch.cat(
                [get(attn + f"{p}_proj.bias") for p in "qkv"]
            )
        state[dst + "self_attn.o_proj.weight"] = get(attn + "o_proj.weight")
        if spec.qk_norm:
            for norm in ("q_norm", "k_norm"):
                state[dst + f"self_attn.{norm}.weight"] = get(attn + f"{norm}.weight")
        if spec.fused_projections:
            state[dst + "mlp.gate_up_proj.weight"] = get(src + "mlp.gate_up_proj.weight")
        else:
            state[dst + "mlp.gate_up_proj.weight"] = torch.cat(
                [get(src + "mlp.gate_proj.weight"), get(src + "mlp.up_proj.weight")]
            )
        state[dst + "mlp.down_proj.weight"] = get(src + "mlp.down_proj.weight")
        for norm in spec.layer_norm_roles.values():
            state[dst + f"{norm}.weight"] = get(src + f"{norm}.weight")
    arch = ARCHITECTURES[spec.model_type]
    if arch.norm_offset:  # Gemma: (1 + w) folded into the weights (exact in float32)
        for name, value in state.items():
            if name.endswith("norm.weight"):
                state[name] = value + arch.norm_offset
    return state

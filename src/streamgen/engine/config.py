"""EngineConfig: one frozen object composing every knob of the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from streamgen.errors import ConfigError
from streamgen.spec.config import SpeculationConfig

_DTYPES = ("float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "half")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Configuration of an :class:`~streamgen.Engine`.

    Values discovered at start-up (the number of KV blocks that fit in
    ``kv_cache_bytes``) are reported by ``engine.stats()``, never written back.

    >>> EngineConfig(max_num_seqs=8).max_num_seqs
    8
    >>> EngineConfig.preset("low_latency").max_num_batched_tokens
    256
    """

    dtype: str = "float32"
    # torch intra-op threads and the native kernels' worker pool (None: torch's setting,
    # and every CPU this process may run on for the quantized kernels; a LoadedModel's
    # pool is resized to it when the engine starts)
    threads: int | None = None
    # "auto": a GGUF file (and the default model) in its own quantized types, a dense
    # checkpoint dense; None: dense weights in `dtype` (exact against HF transformers);
    # "gguf": a GGUF's own types; "q8_0" / "q4_0" / "q4_1" / "q5_0" / "q5_1" / "q4_k":
    # quantize a dense checkpoint at load (llama.cpp's rounding; a tensor whose rows do not
    # split into Q4_K's 256-value blocks falls back to Q5_0, as llama-quantize does).
    # Quantized weights compute in fp32.
    quantization: str | None = "auto"
    # Quantized weights: 8 = int8 activations per 32 inputs (llama.cpp's arithmetic);
    # 16 = two int8 roundings (the residual too): ~20% slower at batch 1, as close to the
    # dense model as fp32 rounding. The LM head always takes 16.
    activation_bits: int = 8
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: as many as fit in kv_cache_bytes
    kv_cache_bytes: int = 512 << 20
    # the KV cache's elements: "float32", "bfloat16" or "float16"; None: float16 for a
    # quantized model (llama.cpp's default; half the bytes every step's attention reads),
    # else the model's dtype
    kv_cache_dtype: str | None = None
    num_host_blocks: int = 0  # host pool for swap preemption
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    long_prefill_chunk: int | None = None
    preemption_mode: Literal["recompute", "swap"] = "recompute"
    stream_buffer: int = 16  # tokens a stream holds before its request pauses
    # "auto" on CPU: native kernels for real models, else flex, else torch (attention/auto.py)
    attention_backend: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    seed: int | None = None
    speculation: SpeculationConfig | None = None  # None: no speculative decoding
    # Replay captured CUDA graphs for decode steps of up to max_num_seqs sequences
    # (runner/cuda_graph.py). Applies to models on a CUDA device; ignored elsewhere.
    cuda_graphs: bool = False
    # Opt-in aging against starvation: a waiting request's effective priority rises by one
    # for every `priority_aging_s` seconds it has waited (None: strict priority order).
    priority_aging_s: float | None = None

    def __post_init__(self) -> None:
        positive = {
            "block_size": self.block_size,
            "kv_cache_bytes": self.kv_cache_bytes,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "max_num_seqs": self.max_num_seqs,
            "stream_buffer": self.stream_buffer,
        }
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        for name, opt in (
            ("num_kv_blocks", self.num_kv_blocks),
            ("threads", self.threads),
            ("max_model_len", self.max_model_len),
            ("long_prefill_chunk", self.long_prefill_chunk),
        ):
            if opt is not None and (not isinstance(opt, int) or isinstance(opt, bool) or opt < 1):
                raise ConfigError(f"{name} must be None or a positive int, got {opt!r}")
        if str(self.dtype).removeprefix("torch.") not in _DTYPES:  # a name or a torch dtype
            raise ConfigError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        kv = self.kv_cache_dtype
        if kv is not None and str(kv).removeprefix("torch.") not in _DTYPES:
            raise ConfigError(f"kv_cache_dtype must be None or one of {list(_DTYPES)}, got {kv!r}")
        from streamgen.attention.registry import available_backends

        backends = ("auto", *available_backends())
        if not isinstance(self.attention_backend, str) or self.attention_backend not in backends:
            raise ConfigError(
                f"attention_backend must be one of {list(backends)}, got {self.attention_backend!r}"
            )
        for name, flag in (
            ("enable_prefix_caching", self.enable_prefix_caching),
            ("cuda_graphs", self.cuda_graphs),
        ):
            if not isinstance(flag, bool):
                raise ConfigError(f"{name} must be a bool, got {flag!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not -(2**63) <= self.seed < 2**64
        ):  # what the engine's generator takes as a seed
            raise ConfigError(f"seed must be None or an int in [-2**63, 2**64), got {self.seed!r}")
        aging = self.priority_aging_s
        if aging is not None and (
            isinstance(aging, bool)
            or not isinstance(aging, int | float)
            or not aging > 0
            or aging == float("inf")
        ):
            raise ConfigError(f"priority_aging_s must be None or a positive number, got {aging!r}")
        from streamgen.checkpoint.quantization import check_quantization

        check_quantization(self.quantization, self.activation_bits)
        if (
            isinstance(self.num_host_blocks, bool)
            or not isinstance(self.num_host_blocks, int)
            or self.num_host_blocks < 0
        ):
            raise ConfigError(f"num_host_blocks must be >= 0, got {self.num_host_blocks}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ConfigError(
                f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}"
            )
        if self.speculation is not None and not isinstance(self.speculation, SpeculationConfig):
            raise ConfigError(
                f"speculation must be a SpeculationConfig or None, "
                f"got {type(self.speculation).__name__}"
            )
        if self.preemption_mode == "swap" and self.num_host_blocks == 0:
            raise ConfigError("preemption_mode='swap' needs num_host_blocks > 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> EngineConfig:
        """``"low_latency" | "balanced" | "high_throughput"``, overridable field by field."""
        presets: dict[str, dict[str, Any]] = {
            "low_latency": dict(
                max_num_batched_tokens=256, max_num_seqs=8, stream_buffer=4, cuda_graphs=True
            ),
            "balanced": dict(max_num_batched_tokens=512, max_num_seqs=64, cuda_graphs=True),
            "high_throughput": dict(
                max_num_batched_tokens=2048, max_num_seqs=256, stream_buffer=64
            ),
        }
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

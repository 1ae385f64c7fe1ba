"""EngineConfig: one frozen object composing every knob of the engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from streamgen.errors import ConfigError
from streamgen.spec.config import SpeculationConfig


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
    # and every CPU this process may run on for the quantized kernels)
    threads: int | None = None
    # "auto": a GGUF file (and the default model) in its own quantized types, a dense
    # checkpoint dense; None: dense weights in `dtype` (exact against HF transformers);
    # "gguf": a GGUF's own types; "q8_0" / "q4_0" / "q4_1" / "q5_0" / "q5_1": quantize a
    # dense checkpoint at load (llama.cpp's rounding). Quantized weights compute in fp32.
    quantization: str | None = "auto"
    # Quantized weights: 8 = int8 activations per 32 inputs (llama.cpp's arithmetic);
    # 16 = two int8 roundings (the residual too): ~20% slower at batch 1, as close to the
    # dense model as fp32 rounding. The LM head always takes 16.
    activation_bits: int = 8
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: as many as fit in kv_cache_bytes
    kv_cache_bytes: int = 512 << 20
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
        for name, opt in (("num_kv_blocks", self.num_kv_blocks), ("threads", self.threads),
                          ("max_model_len", self.max_model_len)):
            if opt is not None and (not isinstance(opt, int) or opt < 1):
                raise ConfigError(f"{name} must be None or a positive int, got {opt!r}")
        from streamgen.checkpoint.quantized_model import check_quantization

        check_quantization(self.quantization, self.activation_bits)
        if self.num_host_blocks < 0:
            raise ConfigError(f"num_host_blocks must be >= 0, got {self.num_host_blocks}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ConfigError(f"preemption_mode must be 'recompute' or 'swap', "
                              f"got {self.preemption_mode!r}")
        if self.speculation is not None and not isinstance(self.speculation, SpeculationConfig):
            raise ConfigError(f"speculation must be a SpeculationConfig or None, "
                              f"got {type(self.speculation).__name__}")
        if not isinstance(self.cuda_graphs, bool):
            raise ConfigError(f"cuda_graphs must be a bool, got {self.cuda_graphs!r}")
        if self.preemption_mode == "swap" and self.num_host_blocks == 0:
            raise ConfigError("preemption_mode='swap' needs num_host_blocks > 0")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> EngineConfig:
        """``"low_latency" | "balanced" | "high_throughput"``, overridable field by field."""
        presets: dict[str, dict[str, Any]] = {
            "low_latency": dict(max_num_batched_tokens=256, max_num_seqs=8, stream_buffer=4,
                                cuda_graphs=True),
            "balanced": dict(max_num_batched_tokens=512, max_num_seqs=64, cuda_graphs=True),
            "high_throughput": dict(max_num_batched_tokens=2048, max_num_seqs=256,
                                    stream_buffer=64),
        }
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return cls(**{**presets[name], **overrides})

"""Per-layer paged K/V tensors.

Layout per layer: ``[num_blocks, block_size, num_kv_heads, head_dim]``; a
token's slot is ``block * block_size + offset``. Which blocks belong to whom
is bookkeeping in ``streamgen.kv`` (pure Python); this module only owns the
memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamgen.errors import ConfigError
from streamgen.model.config import ModelSpec

DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    """Size of the paged KV cache: ``num_blocks`` wins over ``memory_bytes``."""

    block_size: int = DEFAULT_BLOCK_SIZE
    num_blocks: int | None = None
    memory_bytes: int = 1 << 30
    dtype: torch.dtype | None = None  # None: default_kv_dtype()

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.memory_bytes < 1:
            raise ConfigError(f"memory_bytes must be >= 1, got {self.memory_bytes}")


def default_kv_dtype(model_dtype: torch.dtype, quantized: bool) -> torch.dtype:
    """The KV cache's dtype when the config names none: float16 for a quantized model (as
    llama.cpp's default: every step's attention reads the whole cache, and float32 had
    doubled those bytes, ~a quarter of a 600-token decode step's memory traffic), else
    the model's own dtype (a dense model stays exact against HF transformers).

    >>> default_kv_dtype(torch.float32, quantized=True)
    torch.float16
    """
    return torch.float16 if quantized else model_dtype


def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
    """K and V bytes of one block over all layers."""
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * elem


class PagedKVCache:
    """The KV memory of one model: a (k, v) pair of tensors per layer."""

    def __init__(
        self,
        spec: ModelSpec,
        config: KVCacheConfig,
        model_dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.dtype = config.dtype or model_dtype
        self.block_size = config.block_size
        self.num_blocks = config.num_blocks or max(
            1, config.memory_bytes // bytes_per_block(spec, config.block_size, self.dtype)
        )
        shape = (self.num_blocks, self.block_size, spec.num_kv_heads, spec.head_dim)
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = [
            (
                torch.zeros(shape, dtype=self.dtype, device=device),
                torch.zeros(shape, dtype=self.dtype, device=device),
            )
            for _ in range(spec.num_layers)
        ]

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size


def copy_blocks(
    src: PagedKVCache, dst: PagedKVCache, pairs: list[tuple[int, int]]
) -> None:
    """Copy whole blocks ``src_block -> dst_block`` in every layer (copy-on-write
    within one cache, or swap between the device and the host cache)."""
    if not pairs:
        return
    device_of = src.layers[0][0].device
    src_ids = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=device_of)
    dst_ids = torch.tensor([d for _, d in pairs], dtype=torch.int64)
    dst_ids = dst_ids.to(dst.layers[0][0].device)
    for (src_k, src_v), (dst_k, dst_v) in zip(src.layers, dst.layers, strict=True):
        dst_k.index_copy_(0, dst_ids, src_k.index_select(0, src_ids).to(dst_k.device))
        dst_v.index_copy_(0, dst_ids, src_v.index_select(0, src_ids).to(dst_v.device))

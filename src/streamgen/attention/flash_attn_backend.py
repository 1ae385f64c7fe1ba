"""flash-attn 2 backend (CUDA): varlen prefill and paged decode from the ``flash_attn`` package.

Block size. flash-attn 2's paged KV path (``block_table=``) only takes pages
whose size is a multiple of 256 tokens (its CUDA code checks "Paged KV cache
block size must be divisible by 256"); streamgen's blocks are 16 tokens by
default. So the backend picks, once per step::

    block_size % 256 == 0   paged:     all decodes: flash_attn_with_kvcache(block_table=...)
                                       otherwise:   flash_attn_varlen_func(block_table=...)
    any other block size    gathered:  the step's keys are gathered from their blocks into
                                       a packed [total_keys, kv_heads, dim] copy per layer,
                                       then flash_attn_varlen_func(cu_seqlens_k=...)

The gathered path costs one extra copy of the step's context per layer.

Steps flash-attn cannot express go to the Triton backend
(:class:`~streamgen.attention.triton_backend.TritonAttentionBackend`): token
trees (``tree_mask``), fp8 or float32 caches, head sizes flash-attn lacks.
``write_kv`` always uses the Triton reshape-and-cache kernel.

Constructing the backend without ``flash_attn`` installed, or without a CUDA
device, raises :class:`~streamgen.errors.BackendUnavailableError`.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from streamgen.attention.backend import AttentionBackend, AttentionMetadata
from streamgen.errors import BackendUnavailableError

FLASH_PAGE_MULTIPLE = 256  # flash-attn 2 paged KV page sizes must be multiples of this


@dataclass(frozen=True, slots=True)
class _FlashPlan:
    paged: bool  # block_size fits flash-attn's paged KV
    all_decodes: bool
    cu_seqlens_q: torch.Tensor  # [num_seqs + 1] int32
    cu_seqlens_k: torch.Tensor  # [num_seqs + 1] int32
    max_seqlen_q: int
    max_seqlen_k: int
    seq_lens: torch.Tensor  # [num_seqs] int32 (cache_seqlens)
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    key_slots: torch.Tensor | None  # [total_keys] int64 cache slots (gathered path only)


class FlashAttnBackend(AttentionBackend):
    """Attention through ``flash_attn`` 2 on CUDA, falling back to Triton where it cannot.

    >>> backend = FlashAttnBackend()  # doctest: +SKIP  (needs flash_attn and a GPU)
    >>> backend.name                  # doctest: +SKIP
    'flash_attn'
    """

    name = "flash_attn"
    windowed_trees = True

    def __init__(self) -> None:
        self._varlen, self._with_kvcache = _import_flash_attn()
        if not torch.cuda.is_available():
            raise BackendUnavailableError("the flash_attn backend needs a CUDA device")
        self._varlen_takes_block_table = "block_table" in inspect.signature(self._varlen).parameters
        from streamgen.attention.triton_backend import TritonAttentionBackend

        self._fallback = TritonAttentionBackend()
        self._plan_for: AttentionMetadata | None = None
        self._plan: _FlashPlan | None = None

    def prepare(self, metadata: AttentionMetadata) -> None:
        self._plan_for = metadata
        self._plan = _make_plan(metadata, self._varlen_takes_block_table)
        if metadata.tree_mask is not None:
            self._fallback.prepare(metadata)

    def write_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> None:
        self._fallback.write_kv(key, value, k_cache, v_cache, metadata)

    def attend(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        if not _flash_can_run(query, k_cache, metadata):
            return self._fallback.attend(query, k_cache, v_cache, metadata, scale)
        if self._plan_for is not metadata or self._plan is None:
            self.prepare(metadata)
        plan = self._plan
        assert plan is not None
        window = metadata.sliding_window
        softcap = metadata.logit_softcap or 0.0  # flash-attn >= 2.6: 0 means none
        # flash-attn windows are inclusive: key j is seen from i iff i - left <= j <= i.
        window_size = (-1, -1) if window is None else (window - 1, 0)
        if plan.paged and plan.all_decodes:
            out = self._with_kvcache(
                query.unsqueeze(1), k_cache, v_cache,
                cache_seqlens=plan.seq_lens, block_table=plan.block_tables,
                softmax_scale=scale, causal=True, window_size=window_size, softcap=softcap,
            )  # fmt: skip  # [num_seqs, 1, num_heads, head_dim]
            return out.squeeze(1)
        if plan.paged:
            keys, values, block_table = k_cache, v_cache, plan.block_tables
        else:
            assert plan.key_slots is not None
            num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
            # [total_keys, num_kv_heads, head_dim]: every sequence's context, packed.
            keys = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, plan.key_slots)
            values = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, plan.key_slots)
            block_table = None
        extra: dict[str, Any] = {} if block_table is None else {"block_table": block_table}
        out = self._varlen(
            query, keys, values, plan.cu_seqlens_q, plan.cu_seqlens_k,
            plan.max_seqlen_q, plan.max_seqlen_k,
            softmax_scale=scale, causal=True, window_size=window_size, softcap=softcap,
            **extra,
        )  # fmt: skip
        assert isinstance(out, torch.Tensor)
        return out


def _import_flash_attn() -> tuple[Any, Any]:
    try:
        module = importlib.import_module("flash_attn")
    except (ImportError, OSError) as error:
        raise BackendUnavailableError(
            f"the flash_attn backend needs the flash-attn package (pip install flash-attn): {error}"
        ) from error
    return module.flash_attn_varlen_func, module.flash_attn_with_kvcache


def _flash_can_run(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    metadata: AttentionMetadata,
) -> bool:
    head_dim = query.shape[2]
    return (
        metadata.tree_mask is None
        and query.dtype in (torch.float16, torch.bfloat16)
        and k_cache.dtype == query.dtype
        and head_dim % 8 == 0
        and head_dim <= 256
    )


def _make_plan(metadata: AttentionMetadata, varlen_takes_block_table: bool) -> _FlashPlan:
    device = metadata.slot_mapping.device
    block_size = metadata.block_size
    seq_lens_list = metadata.seq_lens_list
    all_decodes = all(length == 1 for length in metadata.query_lens_list)
    paged = block_size % FLASH_PAGE_MULTIPLE == 0 and (all_decodes or varlen_takes_block_table)
    key_starts = [0]
    for length in seq_lens_list:
        key_starts.append(key_starts[-1] + length)
    key_slots = None
    if not paged:
        seq_ids = torch.repeat_interleave(
            torch.arange(len(seq_lens_list), device=device),
            metadata.seq_lens.to(device),
            output_size=key_starts[-1],
        )  # [total_keys]
        starts = torch.tensor(key_starts[:-1], device=device)
        positions = torch.arange(key_starts[-1], device=device) - starts[seq_ids]
        blocks = metadata.block_tables[seq_ids, positions // block_size]
        key_slots = blocks * block_size + positions % block_size
    return _FlashPlan(
        paged=paged,
        all_decodes=all_decodes,
        cu_seqlens_q=metadata.query_start_loc.to(torch.int32),
        cu_seqlens_k=torch.tensor(key_starts, dtype=torch.int32, device=device),
        max_seqlen_q=max(metadata.query_lens_list, default=0),
        max_seqlen_k=max(seq_lens_list, default=0),
        seq_lens=metadata.seq_lens.to(torch.int32),
        block_tables=metadata.block_tables.to(torch.int32),
        key_slots=key_slots,
    )

"""Native CPU attention: short chunks read the paged cache in place, long ones go to SDPA.

The torch reference gathers every sequence's blocks (padded to the longest
context of its group) into fresh K/V tensors in every layer; with 64
decodes of ~450 tokens that is ~50 MB copied per layer before SDPA reads it
again. Here the chunks of up to ``max_native_chunk`` new tokens (decodes,
draft trees, short prefill chunks) go to ``sg_paged_attention``
(``streamgen/native/attention.c``), which walks each sequence's block
table and reads every cached key and value once per KV head, in the cache's
dtype; longer chunks (prefill) go to the reference, whose SDPA is the faster
kernel for them::

    step:  | 40 decodes | tree of 9 | 512-token prefill chunk |
             `----- native, one call -----'  `-- reference --'

Same semantics as the reference (bottom-right causal, sliding window, token
trees, a window over a tree from each node's depth); tests/attention/test_native_backend.py
checks it against the reference. Steps the kernel has no path for (a non-CPU device, a
dtype other than float32 / bfloat16 / float16) go to the reference whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamgen.attention.backend import AttentionBackend, AttentionMetadata
from streamgen.attention.sub_batch import SubBatch, attend_sub_batch, sub_batch
from streamgen.attention.torch_ref import SHORT_CHUNK, TorchReferenceBackend
from streamgen.native.build import NativeUnavailableError
from streamgen.native.kernels import NativeKernels, NativeModel, kv_dtype_code, native_kernels
from streamgen.native.qkernels import Isa, attention_table


@dataclass(frozen=True, slots=True)
class _StepPlan:
    # Chunks of <= max_native_chunk tokens; the step's own metadata when they are all of
    # them (reference None: no gather / scatter of rows, no sub-batch built).
    native: SubBatch
    reference: SubBatch | None  # longer chunks
    tree_mask: torch.Tensor | None  # [native_rows, max_q] uint8, contiguous


class NativeAttentionBackend(AttentionBackend):
    """Paged attention through the native CPU kernels; the torch reference is its oracle.

    ``max_native_chunk``: chunks with more new tokens go to the reference.
    ``kernels``: the loaded kernels (default: :func:`native_kernels`); raises
    :class:`~streamgen.native.build.NativeUnavailableError` where they do not build.
    ``isa``: whose attention loops to run (default: :func:`select_isa`'s, as the native
    decoder's; tests pass each one this CPU has).

    >>> backend = NativeAttentionBackend()  # doctest: +SKIP
    >>> out = backend.attend(query, k_cache, v_cache, metadata, scale)
    """

    name = "native"
    windowed_trees = True

    def __init__(
        self,
        *,
        max_native_chunk: int = SHORT_CHUNK,
        kernels: NativeKernels | None = None,
        isa: Isa | None = None,
    ) -> None:
        if max_native_chunk < 1:
            raise ValueError(f"max_native_chunk must be positive, got {max_native_chunk}")
        kernels = kernels or native_kernels()
        if kernels is None:
            raise NativeUnavailableError("the native CPU kernels could not be built or loaded")
        self.kernels = kernels
        self.table = attention_table(isa)
        self.max_native_chunk = max_native_chunk
        self.reference = TorchReferenceBackend()
        self._plan_for: AttentionMetadata | None = None
        self._plan: _StepPlan | None = None
        self._structs: dict[tuple[int | float, ...], NativeModel] = {}

    def prepare(self, metadata: AttentionMetadata) -> None:
        self._plan_for, self._plan = metadata, self._make_plan(metadata)

    def attend(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        if self._plan_for is not metadata:
            self.prepare(metadata)
        plan = self._plan
        code = kv_dtype_code(k_cache.dtype)
        if plan is None or code is None or query.device.type != "cpu":
            return self.reference.attend(query, k_cache, v_cache, metadata, scale)
        if plan.reference is None:
            return self._native(query, k_cache, v_cache, plan, code, scale)
        rows = plan.native.rows
        output = torch.empty_like(query)
        picked = self._native(query.index_select(0, rows), k_cache, v_cache, plan, code, scale)
        output.index_copy_(0, rows, picked)
        attend_sub_batch(self.reference, query, k_cache, v_cache, plan.reference, scale, output)
        return output

    def _native(
        self,
        query: torch.Tensor,  # [rows, num_heads, head_dim], the native chunks' rows
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: _StepPlan,
        code: int,
        scale: float,
    ) -> torch.Tensor:  # [rows, num_heads, head_dim]
        metadata = plan.native.metadata
        rows, num_heads, head_dim = query.shape
        q = query.reshape(rows, num_heads * head_dim).to(torch.float32).contiguous()
        out = torch.empty_like(q)
        struct = self._struct(k_cache, num_heads, metadata, scale, code)
        self.kernels.paged_attention(
            struct,
            k_cache,
            v_cache,
            q,
            metadata.query_start_loc,
            metadata.seq_lens,
            metadata.block_tables,
            plan.tree_mask,
            out,
        )
        return out.view(rows, num_heads, head_dim).to(query.dtype)

    def _struct(
        self,
        k_cache: torch.Tensor,
        num_heads: int,
        metadata: AttentionMetadata,
        scale: float,
        code: int,
    ) -> NativeModel:
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        window = metadata.sliding_window or 0
        softcap = metadata.logit_softcap or 0.0
        key = (num_heads, num_kv_heads, head_dim, block_size, window, code, scale, softcap)
        struct = self._structs.get(key)
        if struct is None:
            struct = NativeModel(
                num_heads * head_dim, num_heads * head_dim, num_kv_heads * head_dim, 0,
                num_heads, num_kv_heads, head_dim, block_size, window, 0.0, scale, 0, 1.0,
                None, 0, 0, head_dim, 1, self.table, softcap, code,
            )  # fmt: skip
            self._structs[key] = struct
        return struct

    def _make_plan(self, metadata: AttentionMetadata) -> _StepPlan | None:
        if metadata.slot_mapping.device.type != "cpu":
            return None
        lens = metadata.query_lens_list
        short = [i for i, q in enumerate(lens) if q <= self.max_native_chunk]
        if not short:
            return None
        longer = [i for i, q in enumerate(lens) if q > self.max_native_chunk]
        if longer:
            native = sub_batch(metadata, short)
        else:  # the whole step: its own metadata (rows only stand for "all of them")
            rows = torch.arange(metadata.num_tokens, device=metadata.slot_mapping.device)
            native = SubBatch(metadata=metadata, rows=rows)
        tree_mask = native.metadata.tree_mask
        return _StepPlan(
            native=native,
            reference=sub_batch(metadata, longer) if longer else None,
            tree_mask=None if tree_mask is None else tree_mask.to(torch.uint8).contiguous(),
        )

"""FlexAttention backend: paged attention that reads the KV cache in place.

``torch.nn.attention.flex_attention``, compiled by inductor (a C++ kernel on
x86 CPUs, Triton on GPUs), walks a ``BlockMask`` of *physical* pages, so a
decode never gathers its sequence's context (the reference backend does, every
layer). The cache is seen as one long key sequence::

    k_cache [num_pages, block_size, kv_heads, head_dim]
       -> key [1, kv_heads, num_pages * block_size, head_dim]   (a view, no copy)

    key slot of page p, offset o  =  p * block_size + o
    its position in the sequence  =  block_to_logical[p] * block_size + o

A step is split by chunk length (``max_flex_chunk``, default 1):

    decodes   flex, query [seqs, kv_heads, group, head_dim]: one tile per
              sequence and KV head, the ``group`` query heads of a KV head are
              its rows, so each page is read once per KV head
    chunks    up to max_flex_chunk tokens: flex, packed tile by tile
              (``q_tile`` tokens x group rows, padded; a tile is one chunk's)

                packed: | seq 3: 16 | seq 3: 5 + 11 pad | seq 7: 16 | ...
                pages:  full pages (no mask) + partial pages (the mask runs)

              longer: the torch reference (gather + SDPA), faster for them
              on CPU with 16-token pages

Masks (``flex_calls.py``): bottom-right causal, the sliding window, and token
trees (``AttentionMetadata.tree_mask``). Each of the two calls is compiled
once per backend, lazily, with dynamic batch sizes: steady-state steps never
recompile (``flex_plan.py`` says how).

Compilation needs inductor's backend for the device (x86 with AVX2 and a C++
compiler, or Triton): :func:`check_flex_available` says why not, without
compiling. A compile failure raises :class:`FlexUnavailableError`, or, with
``fallback_to_reference=True``, switches the backend to the torch reference
for good.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from streamgen.attention.backend import AttentionBackend, AttentionMetadata
from streamgen.attention.flex_plan import (
    NO_WINDOW,
    DecodePlan,
    ExtendPlan,
    PageListArena,
    PageLists,
    block_to_logical,
    plan_decodes,
    plan_extends,
)
from streamgen.attention.sub_batch import SubBatch, attend_sub_batch, sub_batch
from streamgen.attention.torch_ref import TorchReferenceBackend
from streamgen.errors import StreamgenError

logger = logging.getLogger(__name__)


class FlexUnavailableError(StreamgenError):
    """FlexAttention cannot be compiled here (no compiler, unsupported CPU or device)."""


def check_flex_available(device: torch.device | str = "cpu") -> None:
    """Raise :class:`FlexUnavailableError` with the reason if flex cannot run on
    ``device``. Cheap: it inspects the environment, it compiles nothing.

    >>> check_flex_available("cpu")  # doctest: +SKIP
    """
    try:
        import torch._dynamo
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as exc:
        raise FlexUnavailableError(f"this torch has no flex_attention: {exc}") from exc
    if not torch._dynamo.is_dynamo_supported() or torch._dynamo.config.disable:
        raise FlexUnavailableError("torch.compile is unavailable or disabled in this process")
    kind = torch.device(device).type
    if kind == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler
            from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported
        except ImportError as exc:
            raise FlexUnavailableError(f"inductor has no CPU flex kernel: {exc}") from exc
        if not check_cpu_supported():
            raise FlexUnavailableError("inductor's CPU flex kernel needs an x86 CPU with AVX2")
        try:
            get_cpp_compiler()
        except Exception as exc:  # inductor raises its own InvalidCxxCompiler
            raise FlexUnavailableError(f"no C++ compiler for inductor: {exc}") from exc
    elif kind == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise FlexUnavailableError("flex on CUDA needs Triton")
    else:
        raise FlexUnavailableError(f"flex is not supported on device type {kind!r}")


def flex_available(device: torch.device | str = "cpu") -> bool:
    """Whether :func:`check_flex_available` passes."""
    try:
        check_flex_available(device)
    except FlexUnavailableError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class _StepPlan:
    decode: DecodePlan | None  # chunks of one new token
    extend: ExtendPlan | None  # chunks of 2 ..= max_flex_chunk new tokens
    reference: SubBatch | None  # longer chunks, for the torch reference
    block_to_logical: torch.Tensor  # [num_pages] int32
    window: torch.Tensor  # [1] int64, the sliding window (NO_WINDOW: none)


class FlexAttentionBackend(AttentionBackend):
    """Paged attention with FlexAttention; the torch reference is its oracle.

    ``max_flex_chunk``: chunks with more new tokens go to the torch reference
    (on a 2-core AVX2 CPU its SDPA beat flex's 16-token pages 1.5-2x on prefill
    chunks, while flex beat its gather 2-5x on decodes). ``q_tile``: query rows
    per tile of a chunk. ``device``: probe it now (otherwise at the first
    ``attend``). ``fallback_to_reference``: when flex is unavailable or fails to
    compile, log it and continue with the reference instead of raising
    :class:`FlexUnavailableError`. ``min_decode_keys``: decodes go to the
    reference while their contexts add up to fewer keys (a flex call has a
    fixed cost of ~0.3-0.4 ms per layer on CPU, mostly dynamo's guard check,
    which a small decode batch's gather + SDPA undercuts; 0: always flex).

    >>> backend = FlexAttentionBackend()  # doctest: +SKIP
    >>> out = backend.attend(query, k_cache, v_cache, metadata, scale)  # compiles once
    """

    name = "flex"
    windowed_trees = True

    def __init__(
        self,
        *,
        max_flex_chunk: int = 1,
        q_tile: int = 16,
        device: torch.device | str | None = None,
        fallback_to_reference: bool = False,
        min_decode_keys: int = 0,
    ) -> None:
        if max_flex_chunk < 1 or q_tile < 1:
            raise ValueError(
                f"max_flex_chunk and q_tile must be positive, got {max_flex_chunk}, {q_tile}"
            )
        if min_decode_keys < 0:
            raise ValueError(f"min_decode_keys must be >= 0, got {min_decode_keys}")
        self.max_flex_chunk = max_flex_chunk
        self.min_decode_keys = min_decode_keys
        self.q_tile = q_tile
        self.fallback_to_reference = fallback_to_reference
        self.reference = TorchReferenceBackend()
        self.disabled_reason: str | None = None  # set once flex failed (fallback mode)
        self._compiled: dict[tuple[Any, ...], Callable[..., torch.Tensor]] = {}
        self._checked_devices: set[torch.device] = set()
        self._arena = PageListArena()
        self._plan_key: tuple[AttentionMetadata, int] | None = None
        self._plan: _StepPlan | None = None
        if device is not None:
            self._check_device(torch.device(device))

    def prepare(self, metadata: AttentionMetadata) -> None:
        # Planning needs the number of pages, known at the first attend of the step.
        self._plan_key, self._plan = None, None

    def attend(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_pages, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        if self.disabled_reason is None and query.device not in self._checked_devices:
            self._check_device(query.device)
        plan = None if self.disabled_reason else self._step_plan(metadata, k_cache.shape[0])
        if metadata.logit_softcap is not None:
            plan = None  # soft-capped scores (Gemma 2): the reference serves them
        # No plan: flex is off, no chunk is flex's, or a page sits at two logical
        # positions (not expressible by the masks).
        if plan is None:
            return self.reference.attend(query, k_cache, v_cache, metadata, scale)
        try:
            return self._attend(query, k_cache, v_cache, plan, scale)
        except _compile_errors() as exc:
            self._disable(f"flex_attention failed to compile: {exc}", exc)
            return self.reference.attend(query, k_cache, v_cache, metadata, scale)

    # ----- one step -----------------------------------------------------------------
    def _attend(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_pages, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        plan: _StepPlan,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        num_pages, block_size, num_kv_heads, head_dim = k_cache.shape
        # The whole cache as one key sequence: [1, kv_heads, num_slots, head_dim], no copy.
        key = k_cache.view(1, num_pages * block_size, num_kv_heads, head_dim).transpose(1, 2)
        value = v_cache.view(1, num_pages * block_size, num_kv_heads, head_dim).transpose(1, 2)
        if plan.decode is not None and plan.decode.covers_batch:
            return self._decodes(query, key, value, plan.decode, plan, scale)
        output = torch.empty_like(query)
        if plan.decode is not None:
            out = self._decodes(query, key, value, plan.decode, plan, scale)
            count = plan.decode.num_seqs
            output.index_copy_(0, plan.decode.rows[:count], out[:count])
        if plan.extend is not None:
            out = self._extends(query, key, value, plan.extend, plan, scale)
            output.index_copy_(0, plan.extend.output_rows, out)
        if plan.reference is not None:
            attend_sub_batch(self.reference, query, k_cache, v_cache, plan.reference, scale, output)
        return output

    def _decodes(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [1, kv_heads, num_slots, head_dim]
        value: torch.Tensor,
        decode: DecodePlan,
        plan: _StepPlan,
        scale: float,
    ) -> torch.Tensor:  # [padded_seqs, num_heads, head_dim]
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads = key.shape[1]
        group = num_heads // num_kv_heads
        block_size = key.shape[2] // plan.block_to_logical.shape[0]
        picked = query if decode.covers_batch else query.index_select(0, decode.rows)
        # GQA folded into rows: q head kv_head * group + g is row g of tile (seq, kv_head).
        # Always a fresh contiguous copy, so the compiled call sees one stride pattern and
        # one dispatch key set (a view of the caller's tensor may differ, and recompile).
        # (clone: `.to(copy=True, memory_format=...)` took 8 ms here for 150 KB.)
        q = picked.clone(memory_format=torch.contiguous_format).to(key.dtype)
        q = q.view(-1, num_kv_heads, group, head_dim)
        lists = _tile_lists(decode.pages, tiles_in_batch=True)
        for tensor in (q, *lists):
            torch._dynamo.mark_dynamic(tensor, 0)
        fn = self._compiled_call("decode", block_size, scale, 1, group)
        out = fn(q, key, value, *lists, plan.block_to_logical, plan.window, decode.query_pos)
        return out.view(-1, num_heads, head_dim).to(query.dtype)

    def _extends(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        key: torch.Tensor,  # [1, kv_heads, num_slots, head_dim]
        value: torch.Tensor,
        extend: ExtendPlan,
        plan: _StepPlan,
        scale: float,
    ) -> torch.Tensor:  # [extend_tokens, num_heads, head_dim]
        num_heads, head_dim = query.shape[1], query.shape[2]
        num_kv_heads = key.shape[1]
        group = num_heads // num_kv_heads
        block_size = key.shape[2] // plan.block_to_logical.shape[0]
        packed = query.index_select(0, extend.rows).to(key.dtype)  # [packed_rows, heads, dim]
        # GQA folded into rows as for decodes: row r * group + g is head kv_head * group + g
        # of packed row r, so a tile reads each page once per KV head.
        q = packed.view(-1, num_kv_heads, group, head_dim).transpose(0, 1)
        q = q.reshape(1, num_kv_heads, -1, head_dim)  # [1, kv_heads, packed_rows * group, dim]
        lists = _tile_lists(extend.pages, tiles_in_batch=False)
        torch._dynamo.mark_dynamic(q, 2)
        for tensor in lists:
            torch._dynamo.mark_dynamic(tensor, 2)
        fn = self._compiled_call("extend", block_size, scale, self.q_tile, group)
        out = fn(
            q,
            key,
            value,
            *lists,
            plan.block_to_logical,
            plan.window,
            extend.row_last,
            extend.row_prefix,
            extend.row_pos,
            extend.tree_rows,
            extend.tree_depths,
        )
        out = out.view(num_kv_heads, -1, group, head_dim).transpose(0, 1)  # [rows, kv_h, g, d]
        picked = out.reshape(-1, num_heads, head_dim).index_select(0, extend.packed_valid)
        return picked.to(query.dtype)

    # ----- plans, compilation, failure ----------------------------------------------
    def _step_plan(self, metadata: AttentionMetadata, num_pages: int) -> _StepPlan | None:
        if (
            self._plan_key is not None
            and self._plan_key[0] is metadata
            and self._plan_key[1] == num_pages
        ):
            return self._plan
        self._plan_key, self._plan = (metadata, num_pages), None
        lens = metadata.query_lens_list
        decodes = [i for i, q in enumerate(lens) if q == 1]
        extends = [i for i, q in enumerate(lens) if 1 < q <= self.max_flex_chunk]
        longer = [i for i, q in enumerate(lens) if q > self.max_flex_chunk and q > 1]
        if decodes and sum(metadata.seq_lens_list[i] for i in decodes) < self.min_decode_keys:
            longer = sorted(longer + decodes)  # a small decode group: the reference is cheaper
            decodes = []
        if not decodes and not extends:
            return None  # the whole step goes to the reference
        mapping = block_to_logical(metadata, num_pages)
        if mapping is None:
            return None
        window = metadata.sliding_window or NO_WINDOW
        arena = self._arena
        self._plan = _StepPlan(
            decode=plan_decodes(metadata, decodes, window, arena, num_pages) if decodes else None,
            extend=plan_extends(metadata, extends, window, self.q_tile, arena, num_pages)
            if extends
            else None,
            reference=sub_batch(metadata, longer) if longer else None,
            block_to_logical=mapping,
            window=torch.tensor([window], device=metadata.block_tables.device),
        )
        return self._plan

    def _compiled_call(
        self, kind: str, block_size: int, scale: float, q_tile: int, group: int
    ) -> Callable[..., torch.Tensor]:
        key = (kind, block_size, scale, q_tile, group)
        if key not in self._compiled:
            from streamgen.attention.flex_calls import decode_call, extend_call

            call = (
                decode_call(block_size, scale, group)
                if kind == "decode"
                else extend_call(block_size, scale, q_tile, group)
            )
            self._compiled[key] = torch.compile(call, fullgraph=True, dynamic=None)
        return self._compiled[key]

    def _check_device(self, device: torch.device) -> None:
        try:
            check_flex_available(device)
        except FlexUnavailableError as exc:
            self._disable(str(exc), exc)
        self._checked_devices.add(device)

    def _disable(self, reason: str, exc: Exception) -> None:
        if not self.fallback_to_reference:
            if isinstance(exc, FlexUnavailableError):
                raise exc
            raise FlexUnavailableError(reason) from exc
        logger.warning("attention backend 'flex' unavailable, using 'torch': %s", reason)
        self.disabled_reason = reason


def _tile_lists(pages: PageLists, tiles_in_batch: bool) -> tuple[torch.Tensor, ...]:
    """The page lists as a BlockMask wants them: counts [B, 1, Q] and ids
    [B, 1, Q, num_pages], with tiles along B (decodes) or Q (packed extends)."""
    tiles = pages.num_partial.shape[0]
    shape = (tiles, 1, 1) if tiles_in_batch else (1, 1, tiles)
    return (
        pages.num_partial.view(shape),
        pages.partial.view(*shape, -1),
        pages.num_full.view(shape),
        pages.full.view(*shape, -1),
    )


def _compile_errors() -> tuple[type[Exception], ...]:
    import torch._dynamo.exc
    import torch._inductor.exc

    return (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.CppCompileError)

"""Triton attention backend: the paged kernels of :mod:`streamgen.kernels`.

Per step (``prepare``) the batch is split by query length::

    query_lens = [1, 5, 1, 3(tree)]      decodes: seqs 0, 2 -> paged_decode (split-K)
                                         extends: seqs 1, 3 -> paged_extend (causal / tree)

Per layer ``attend`` launches at most one decode and one extend kernel. The
extend kernel writes its sequences' rows of the output directly; decode rows
are gathered into a dense ``[num_decodes, heads, dim]`` query and scattered
back, except when the whole step is decodes (then no copy at all).

CUDA graphs: the all-decode path is graph-safe (``supports_cuda_graphs``).
``prepare`` then builds no tensor, and the split-K grid depends only on
``max(seq_lens_list)``, which a captured step sets to ``max_model_len`` (the
kernels read each row's real length from ``seq_lens``; partitions past it do
no work). Partitions grow past ``decode_partition_size`` so that at most
``MAX_DECODE_PARTITIONS`` cover the longest context: the grid and the split-K
buffers stay bounded when a graph is planned for a 128k context.

fp8 caches (``torch.float8_e4m3fn``) are written and read with a unit scale
per head: the :class:`~streamgen.attention.backend.AttentionBackend` interface
does not carry calibrated scales yet. The kernels themselves take per-head
scales (``k_scale`` / ``v_scale``).

On a machine without CUDA the kernels run only under the Triton interpreter
(``TRITON_INTERPRET=1`` set before :mod:`streamgen.kernels` is imported): slow,
for tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamgen.attention.backend import AttentionBackend, AttentionMetadata
from streamgen.errors import BackendUnavailableError

try:
    from streamgen.kernels.common import FP8_DTYPE, KERNELS_INTERPRETED
    from streamgen.kernels.paged_decode import paged_decode_attention
    from streamgen.kernels.paged_extend import paged_extend_attention
    from streamgen.kernels.reshape_and_cache import reshape_and_cache
except ImportError as error:  # triton missing
    raise BackendUnavailableError(f"the triton attention backend needs triton: {error}") from error


MAX_DECODE_PARTITIONS = 64


def decode_partition_size(max_seq_len: int, base: int) -> int:
    """Keys per split-K partition: ``base``, doubled until at most
    :data:`MAX_DECODE_PARTITIONS` partitions cover ``max_seq_len``.

    >>> decode_partition_size(4096, 512), decode_partition_size(131072, 512)
    (512, 2048)
    """
    size = base
    while size * MAX_DECODE_PARTITIONS < max_seq_len:
        size *= 2
    return size


@dataclass(frozen=True, slots=True)
class _StepPlan:
    all_decodes: bool
    # Decode group (None: no decodes, or all_decodes and no gather is needed).
    decode_rows: torch.Tensor | None  # [num_decodes] flat query rows, device
    decode_seqs: torch.Tensor | None  # [num_decodes] sequence indices, device
    max_decode_seq_len: int
    decode_partition_size: int
    # Extend group (None: no extends). seq_ids None with extends: every sequence.
    has_extends: bool
    extend_seqs: torch.Tensor | None  # [num_extends] sequence indices, device
    max_extend_query_len: int


class TritonAttentionBackend(AttentionBackend):
    """Paged attention through Triton kernels (GPU, or the interpreter in tests).

    >>> backend = TritonAttentionBackend()
    >>> backend.name
    'triton'
    """

    name = "triton"
    supports_cuda_graphs = True
    windowed_trees = True

    def __init__(self, *, decode_partition_size: int = 512) -> None:
        self._decode_partition_size = decode_partition_size
        self._plan_for: AttentionMetadata | None = None
        self._plan: _StepPlan | None = None
        self._unit_scales: dict[tuple[torch.device, int], torch.Tensor] = {}

    def prepare(self, metadata: AttentionMetadata) -> None:
        if metadata.slot_mapping.device.type != "cuda" and not KERNELS_INTERPRETED:
            raise BackendUnavailableError(
                "the triton backend needs a CUDA device, or TRITON_INTERPRET=1 set "
                "before streamgen.kernels is first imported"
            )
        self._plan_for = metadata
        self._plan = _make_plan(metadata, self._decode_partition_size)

    def write_kv(
        self,
        key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> None:
        scale = self._scale_for(k_cache)
        reshape_and_cache(key, value, k_cache, v_cache, metadata.slot_mapping, scale, scale)

    def attend(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        if self._plan_for is not metadata or self._plan is None:
            self.prepare(metadata)
        plan = self._plan
        assert plan is not None
        kv_scale = self._scale_for(k_cache)
        window, cap = metadata.sliding_window, metadata.logit_softcap
        if plan.all_decodes:
            return paged_decode_attention(
                query, k_cache, v_cache, metadata.block_tables, metadata.seq_lens, scale,
                max_seq_len=plan.max_decode_seq_len, sliding_window=window, softcap=cap,
                k_scale=kv_scale, v_scale=kv_scale,
                partition_size=plan.decode_partition_size,
            )  # fmt: skip
        output = torch.empty_like(query)
        if plan.has_extends:
            paged_extend_attention(
                query, k_cache, v_cache, metadata.block_tables, metadata.query_start_loc,
                metadata.seq_lens, scale,
                max_query_len=plan.max_extend_query_len, sliding_window=window, softcap=cap,
                tree_mask=metadata.tree_mask, seq_ids=plan.extend_seqs,
                k_scale=kv_scale, v_scale=kv_scale, out=output,
            )  # fmt: skip
        if plan.decode_rows is not None and plan.decode_seqs is not None:
            decode_out = paged_decode_attention(
                query.index_select(0, plan.decode_rows), k_cache, v_cache,
                metadata.block_tables.index_select(0, plan.decode_seqs),
                metadata.seq_lens.index_select(0, plan.decode_seqs), scale,
                max_seq_len=plan.max_decode_seq_len, sliding_window=window, softcap=cap,
                k_scale=kv_scale, v_scale=kv_scale,
                partition_size=plan.decode_partition_size,
            )  # fmt: skip
            output.index_copy_(0, plan.decode_rows, decode_out)
        return output

    def _scale_for(self, cache: torch.Tensor) -> torch.Tensor | None:  # [num_kv_heads] or None
        if cache.dtype != FP8_DTYPE:
            return None
        key = (cache.device, cache.shape[2])
        if key not in self._unit_scales:
            self._unit_scales[key] = torch.ones(key[1], dtype=torch.float32, device=key[0])
        return self._unit_scales[key]


def _make_plan(metadata: AttentionMetadata, base_partition_size: int) -> _StepPlan:
    device = metadata.slot_mapping.device
    query_lens = metadata.query_lens_list
    decode_seqs = [seq for seq, length in enumerate(query_lens) if length == 1]
    extend_seqs = [seq for seq, length in enumerate(query_lens) if length > 1]
    max_decode = max((metadata.seq_lens_list[seq] for seq in decode_seqs), default=0)
    max_extend_query = max((query_lens[seq] for seq in extend_seqs), default=0)
    all_decodes = not extend_seqs
    decode_rows = decode_index = None
    if decode_seqs and not all_decodes:
        starts = [0]
        for length in query_lens:
            starts.append(starts[-1] + length)
        decode_rows = torch.tensor([starts[seq] for seq in decode_seqs], device=device)
        decode_index = torch.tensor(decode_seqs, device=device)
    extend_index = None
    if extend_seqs and decode_seqs:
        extend_index = torch.tensor(extend_seqs, device=device)
    return _StepPlan(
        all_decodes=all_decodes,
        decode_rows=decode_rows,
        decode_seqs=decode_index,
        max_decode_seq_len=max_decode,
        decode_partition_size=decode_partition_size(max_decode, base_partition_size),
        has_extends=bool(extend_seqs),
        extend_seqs=extend_index,
        max_extend_query_len=max_extend_query,
    )

"""Torch reference backend: batched gather + SDPA over the paged cache.

Each step the sequences are split into two groups: decodes (one new token)
and extends (prefill chunks, several new tokens). Every group costs one
gather of its sequences' blocks and one SDPA call per layer, whatever the
number of sequences; there is no Python loop over sequences or tokens in
``attend``.

Causality is bottom-right aligned: new token ``i`` of a sequence with
``q_len`` new tokens and ``seq_len`` context sits at position
``seq_len - q_len + i`` and sees keys ``0 ..= that position`` (within the
sliding window, if the model has one). SDPA's own ``is_causal`` aligns
top-left when query and key lengths differ, so the mask is built explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from streamgen.attention.backend import AttentionBackend, AttentionMetadata


@dataclass(frozen=True, slots=True)
class _GroupPlan:
    query_index: torch.Tensor  # [group_seqs, max_q] rows of the flat query (padding -> 0)
    valid: torch.Tensor  # [group_seqs, max_q] bool, False on padded query slots
    output_rows: torch.Tensor  # [group_tokens] flat rows the valid outputs go to
    block_tables: torch.Tensor  # [group_seqs, num_blocks] physical blocks to gather
    mask: torch.Tensor  # [group_seqs, 1, max_q, num_blocks * block_size] bool
    # The group is the whole batch, unpadded and in order: no gather/scatter of rows.
    covers_batch: bool


class TorchReferenceBackend(AttentionBackend):
    """Portable reference: correct everywhere, batched, and the oracle for faster kernels."""

    name = "torch"

    def __init__(self) -> None:
        self._plan_for: AttentionMetadata | None = None
        self._plans: list[_GroupPlan] = []

    def prepare(self, metadata: AttentionMetadata) -> None:
        self._plan_for = metadata
        self._plans = _make_plans(metadata)

    def attend(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        if self._plan_for is not metadata:
            self.prepare(metadata)
        if len(self._plans) == 1 and self._plans[0].covers_batch:
            return _attend_group(query, k_cache, v_cache, self._plans[0], scale)
        output = torch.empty_like(query)
        for plan in self._plans:
            output[plan.output_rows] = _attend_group(query, k_cache, v_cache, plan, scale)
        return output


def _attend_group(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: _GroupPlan,
    scale: float,
) -> torch.Tensor:  # [group_tokens, num_heads, head_dim]
    num_seqs, num_blocks = plan.block_tables.shape
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    ctx = num_blocks * block_size
    if plan.covers_batch:
        q = query.view(num_seqs, -1, *query.shape[1:]).transpose(1, 2)
    else:
        q = query[plan.query_index].transpose(1, 2)  # [seqs, heads, max_q, head_dim]
    k = k_cache[plan.block_tables].view(num_seqs, ctx, num_kv_heads, head_dim).transpose(1, 2)
    v = v_cache[plan.block_tables].view(num_seqs, ctx, num_kv_heads, head_dim).transpose(1, 2)
    # CPU SDPA kernels are 3x slower in bf16/fp16 than in fp32 on AVX2 machines,
    # and the operands are small: compute in fp32 there.
    compute_dtype = torch.float32 if query.device.type == "cpu" else query.dtype
    out = F.scaled_dot_product_attention(
        q.to(compute_dtype),
        k.to(compute_dtype),
        v.to(compute_dtype),
        attn_mask=plan.mask,
        scale=scale,
        enable_gqa=num_kv_heads != q.shape[1],
    ).to(query.dtype)  # [seqs, heads, max_q, head_dim]
    if plan.covers_batch:
        return out.transpose(1, 2).reshape(query.shape)
    return out.transpose(1, 2)[plan.valid]


def _make_plans(metadata: AttentionMetadata) -> list[_GroupPlan]:
    decode_seqs = [i for i, q in enumerate(metadata.query_lens_list) if q == 1]
    extend_seqs = [i for i, q in enumerate(metadata.query_lens_list) if q > 1]
    return [_make_plan(metadata, seqs) for seqs in (decode_seqs, extend_seqs) if seqs]


def _make_plan(metadata: AttentionMetadata, seqs: list[int]) -> _GroupPlan:
    device = metadata.slot_mapping.device
    block_size = metadata.block_size
    q_lens = torch.tensor([metadata.query_lens_list[i] for i in seqs], dtype=torch.int64)
    s_lens = torch.tensor([metadata.seq_lens_list[i] for i in seqs], dtype=torch.int64)
    starts = metadata.query_start_loc.cpu()[seqs]
    max_q = int(q_lens.max())
    num_blocks = -(-int(s_lens.max()) // block_size)

    offsets = torch.arange(max_q)
    valid = offsets[None, :] < q_lens[:, None]  # [seqs, max_q]
    query_index = torch.where(valid, starts[:, None] + offsets[None, :], 0)
    output_rows = query_index[valid]

    # Position of each query slot; padded slots see key 0 only (avoids NaN rows).
    q_pos = (s_lens - q_lens)[:, None] + offsets[None, :]  # [seqs, max_q]
    q_pos = torch.where(valid, q_pos, 0)
    k_pos = torch.arange(num_blocks * block_size)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [seqs, max_q, ctx]
    if metadata.sliding_window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - metadata.sliding_window

    seq_index = torch.tensor(seqs, dtype=torch.int64, device=device)
    covers_batch = seqs == list(range(metadata.num_seqs)) and bool(valid.all())
    return _GroupPlan(
        query_index=query_index.to(device),
        valid=valid.to(device),
        output_rows=output_rows.to(device),
        block_tables=metadata.block_tables[seq_index, :num_blocks],
        mask=mask[:, None].to(device),
        covers_batch=covers_batch,
    )

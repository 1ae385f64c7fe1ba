"""Torch reference backend: batched gather + SDPA over the paged cache.

Each step the sequences are split into up to three groups: decodes (one new
token), short chunks (draft trees, up to ``SHORT_CHUNK`` new tokens) and long
chunks (prefill), each padded to its own longest query. Every group costs one
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
from streamgen.attention.sub_batch import query_starts


@dataclass(frozen=True, slots=True)
class _GroupPlan:
    query_index: torch.Tensor  # [group_seqs, max_q] rows of the flat query (padding -> 0)
    valid_index: torch.Tensor  # [group_tokens] flat indices of the unpadded query slots
    output_rows: torch.Tensor  # [group_tokens] flat rows the valid outputs go to
    block_tables: torch.Tensor  # [group_seqs, num_blocks] physical blocks to gather
    mask: torch.Tensor | None  # [group_seqs, 1, max_q, kv_len] bool; None: see is_causal
    is_causal: bool  # with mask None: causal (q_len == kv_len) or full (q_len == 1)
    kv_len: int  # keys gathered per sequence (num_blocks * block_size, or exact)
    # The group is the whole batch, unpadded and in order: no gather/scatter of rows.
    covers_batch: bool


class TorchReferenceBackend(AttentionBackend):
    """Portable reference: correct everywhere, batched, and the oracle for faster kernels."""

    name = "torch"
    windowed_trees = True

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
        cap = metadata.logit_softcap
        if len(self._plans) == 1 and self._plans[0].covers_batch:
            return _attend_group(query, k_cache, v_cache, self._plans[0], scale, cap)
        output = torch.empty_like(query)
        for plan in self._plans:
            group_out = _attend_group(query, k_cache, v_cache, plan, scale, cap)
            output.index_copy_(0, plan.output_rows, group_out)
        return output


def _attend_group(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: _GroupPlan,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:  # [group_tokens, num_heads, head_dim]
    num_seqs, num_blocks = plan.block_tables.shape
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    ctx = num_blocks * block_size
    kv_len = plan.kv_len
    if plan.covers_batch:
        q = query.view(num_seqs, -1, *query.shape[1:]).transpose(1, 2)
    else:
        q = query.index_select(0, plan.query_index.view(-1)).view(num_seqs, -1, *query.shape[1:])
        q = q.transpose(1, 2)  # [seqs, heads, max_q, head_dim]
    # index_select is ~2x faster than advanced indexing for these gathers.
    blocks = plan.block_tables.reshape(-1)
    k = k_cache.index_select(0, blocks).view(num_seqs, ctx, num_kv_heads, head_dim)[:, :kv_len]
    v = v_cache.index_select(0, blocks).view(num_seqs, ctx, num_kv_heads, head_dim)[:, :kv_len]
    k, v = k.transpose(1, 2), v.transpose(1, 2)  # [seqs, kv_heads, kv_len, head_dim]
    # CPU SDPA kernels are 3x slower in bf16/fp16 than in fp32 on AVX2 machines,
    # and the operands are small: compute in fp32 there.
    compute_dtype = torch.float32 if query.device.type == "cpu" else query.dtype
    if softcap is not None:
        out = _softcapped_attention(q, k, v, plan, scale, softcap).to(query.dtype)
    else:
        out = _sdpa(q, k, v, plan, scale, compute_dtype).to(query.dtype)
    if plan.covers_batch:
        return out.transpose(1, 2).reshape(query.shape)
    flat = out.transpose(1, 2).reshape(-1, *query.shape[1:])  # [seqs * max_q, heads, head_dim]
    return flat.index_select(0, plan.valid_index)


def _softcapped_attention(
    q: torch.Tensor,  # [seqs, heads, max_q, head_dim]
    k: torch.Tensor,  # [seqs, kv_heads, kv_len, head_dim]
    v: torch.Tensor,
    plan: _GroupPlan,
    scale: float,
    softcap: float,
) -> torch.Tensor:  # [seqs, heads, max_q, head_dim] float32
    """Attention with Gemma 2's soft-capped scores, in float32 (SDPA has no such option)."""
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = (q.float() @ k.transpose(-1, -2)) * scale  # [seqs, heads, max_q, kv_len]
    scores = softcap * torch.tanh(scores / softcap)
    if plan.mask is not None:
        scores = scores.masked_fill(~plan.mask, float("-inf"))
    elif plan.is_causal:  # a whole prompt: max_q == kv_len
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def _sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _GroupPlan, scale: float,
    compute_dtype: torch.dtype,
) -> torch.Tensor:  # fmt: skip
    num_kv_heads = k.shape[1]
    return F.scaled_dot_product_attention(
        q.to(compute_dtype),
        k.to(compute_dtype),
        v.to(compute_dtype),
        attn_mask=plan.mask,
        is_causal=plan.is_causal,
        scale=scale,
        enable_gqa=num_kv_heads != q.shape[1],
    )  # [seqs, heads, max_q, head_dim]


# Chunks up to this many new tokens (draft trees, short chunks) form their own group:
# padded to a prefill chunk's length beside it, a 9-token tree of each of 25 requests
# made a step's attention ~50x larger (2 s steps under load).
SHORT_CHUNK = 32


def _make_plans(metadata: AttentionMetadata) -> list[_GroupPlan]:
    """Decodes, short chunks and long chunks: each group padded to its own longest."""
    lens = metadata.query_lens_list
    decode_seqs = [i for i, q in enumerate(lens) if q == 1]
    short_seqs = [i for i, q in enumerate(lens) if 1 < q <= SHORT_CHUNK]
    long_seqs = [i for i, q in enumerate(lens) if q > SHORT_CHUNK]
    groups = (decode_seqs, short_seqs, long_seqs)
    return [_make_plan(metadata, seqs) for seqs in groups if seqs]


def _make_plan(metadata: AttentionMetadata, seqs: list[int]) -> _GroupPlan:
    device = metadata.slot_mapping.device
    block_size = metadata.block_size
    q_lens = torch.tensor([metadata.query_lens_list[i] for i in seqs], dtype=torch.int64)
    s_lens = torch.tensor([metadata.seq_lens_list[i] for i in seqs], dtype=torch.int64)
    first_rows = query_starts(metadata)
    starts = torch.tensor([first_rows[i] for i in seqs], dtype=torch.int64)  # host, no sync
    max_q = int(q_lens.max())
    num_blocks = -(-int(s_lens.max()) // block_size)

    offsets = torch.arange(max_q)
    valid = offsets[None, :] < q_lens[:, None]  # [seqs, max_q]
    query_index = torch.where(valid, starts[:, None] + offsets[None, :], 0)
    output_rows = query_index[valid]

    seq_index = torch.tensor(seqs, dtype=torch.int64, device=device)
    covers_batch = seqs == list(range(metadata.num_seqs)) and bool(valid.all())
    mask, is_causal, kv_len = _mask(metadata, q_lens, s_lens, valid, num_blocks * block_size)
    if metadata.tree_mask is not None and max_q > 1:
        mask = _apply_tree_mask(
            mask, metadata.tree_mask.cpu(), query_index, q_lens, s_lens, metadata.sliding_window
        )
        is_causal, kv_len = False, num_blocks * block_size
    return _GroupPlan(
        query_index=query_index.to(device),
        valid_index=valid.view(-1).nonzero().view(-1).to(device),
        output_rows=output_rows.to(device),
        block_tables=metadata.block_tables[seq_index, :num_blocks],
        mask=None if mask is None else mask[:, None].to(device),
        is_causal=is_causal,
        kv_len=kv_len,
        covers_batch=covers_batch,
    )


def _mask(
    metadata: AttentionMetadata,
    q_lens: torch.Tensor,  # [seqs]
    s_lens: torch.Tensor,  # [seqs]
    valid: torch.Tensor,  # [seqs, max_q]
    ctx: int,
) -> tuple[torch.Tensor | None, bool, int]:
    """(mask [seqs, max_q, kv_len] or None, is_causal, kv_len) for a group."""
    window = metadata.sliding_window
    seq_len, q_len = int(s_lens[0]), int(q_lens[0])
    plain = window is None or seq_len <= window
    if metadata.tree_mask is not None and q_len > 1:
        plain = False  # the tree overrides the causal part: build the full mask
    if len(s_lens) == 1 and plain and q_len in (1, seq_len):
        # One sequence, keys cut to its length: a decode sees every key, a whole
        # prompt is plain causal. No mask tensor needed (SDPA's fastest path).
        return None, q_len > 1, seq_len
    # Position of each query slot; padded slots see key 0 only (avoids NaN rows).
    offsets = torch.arange(valid.shape[1])
    q_pos = (s_lens - q_lens)[:, None] + offsets[None, :]  # [seqs, max_q]
    q_pos = torch.where(valid, q_pos, 0)
    k_pos = torch.arange(ctx)
    mask = k_pos[None, None, :] <= q_pos[:, :, None]  # [seqs, max_q, ctx]
    if window is not None:
        mask &= k_pos[None, None, :] > q_pos[:, :, None] - window
    return mask, False, ctx


def _apply_tree_mask(
    mask: torch.Tensor | None,  # [seqs, max_q, ctx] causal mask of the group
    tree_mask: torch.Tensor,  # [num_tokens, max_query_len] bool (AttentionMetadata.tree_mask)
    query_index: torch.Tensor,  # [seqs, max_q] flat row of each query slot
    q_lens: torch.Tensor,  # [seqs]
    s_lens: torch.Tensor,  # [seqs]
    window: int | None,
) -> torch.Tensor:  # [seqs, max_q, ctx]
    """Replace the causal part (the sequence's own new tokens) by the tree visibility.

    A tree row's position is the prefix plus its depth (it sees itself and one ancestor
    per depth above it), not its slot; a window counts back from that position, over
    the prefix's keys and the row's ancestors (whose positions are prefix + their
    depths: the i-th key the row sees is at depth i)."""
    assert mask is not None
    ctx = mask.shape[2]
    prefix = (s_lens - q_lens)[:, None, None]  # [seqs, 1, 1]
    k_pos = torch.arange(ctx)[None, None, :]  # [1, 1, ctx]
    own = (k_pos >= prefix) & (k_pos < s_lens[:, None, None])  # [seqs, 1, ctx]
    rows = tree_mask[query_index]  # [seqs, max_q, max_query_len]
    column = (k_pos - prefix).clamp(0, rows.shape[2] - 1).expand(*rows.shape[:2], ctx)
    sees_own = rows.gather(2, column)  # [seqs, max_q, ctx]
    valid = torch.arange(mask.shape[1])[None, :] < q_lens[:, None]  # [seqs, max_q]
    seen_prefix = k_pos < prefix
    if window is not None:
        depth = rows.sum(-1, keepdim=True) - 1  # [seqs, max_q, 1]
        position = prefix + depth
        seen_prefix = seen_prefix & (k_pos > position - window)
        seen_own = sees_own & own
        ancestor_depth = seen_own.cumsum(-1) - 1  # the i-th own key a row sees: depth i
        sees_own = sees_own & (ancestor_depth > depth - window)
    tree = torch.where(own, sees_own, seen_prefix)
    return torch.where(valid[:, :, None], tree, mask)

"""The two functions the flex backend compiles: FlexAttention over the paged
cache for decodes and for packed extends.

Per-step tensors are arguments (sizes that change are marked dynamic by the
caller, so a new batch never recompiles); constants of the model (page size,
scale, GQA group, tile rows) are closed over. The masks turn a key slot into a
position in its sequence through ``block_to_logical`` (see ``flex_plan``) and
run only on the tiles' *partial* pages; full pages skip them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def decode_call(block_size: int, scale: float, group: int) -> Callable[..., Tensor]:
    """Attention of one new token per sequence; a tile is (sequence, KV head)."""

    def decode(
        query: Tensor,  # [seqs, kv_heads, group, head_dim]
        key: Tensor,  # [1, kv_heads, num_slots, head_dim], the cache in place
        value: Tensor,  # [1, kv_heads, num_slots, head_dim]
        num_partial: Tensor,  # [seqs, 1, 1] int32
        partial: Tensor,  # [seqs, 1, 1, num_pages] int32
        num_full: Tensor,  # [seqs, 1, 1] int32
        full: Tensor,  # [seqs, 1, 1, num_pages] int32
        block_to_logical: Tensor,  # [num_pages] int32
        window: Tensor,  # [1] int64
        query_pos: Tensor,  # [capacity >= seqs] int64
    ) -> Tensor:  # [seqs, kv_heads, group, head_dim]
        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            logical = block_to_logical[kv_idx // block_size]
            kv_pos = logical * block_size + kv_idx % block_size
            pos = query_pos[b]
            return (logical >= 0) & (kv_pos <= pos) & (kv_pos > pos - window[0])

        mask = BlockMask.from_kv_blocks(
            num_partial,
            partial,
            num_full,
            full,
            BLOCK_SIZE=(group, block_size),
            mask_mod=mask_mod,
            seq_lengths=(query.shape[2], key.shape[2]),
            compute_q_blocks=False,
        )
        return flex_attention(query, key, value, block_mask=mask, scale=scale)

    return decode


def extend_call(block_size: int, scale: float, q_tile: int, group: int) -> Callable[..., Tensor]:
    """Attention of packed chunks (causal or token trees); a tile is ``q_tile``
    tokens of one chunk times the ``group`` query heads of a KV head."""

    def extend(
        query: Tensor,  # [1, kv_heads, packed_rows * group, head_dim]
        key: Tensor,  # [1, kv_heads, num_slots, head_dim], the cache in place
        value: Tensor,  # [1, kv_heads, num_slots, head_dim]
        num_partial: Tensor,  # [1, 1, tiles] int32
        partial: Tensor,  # [1, 1, tiles, num_pages] int32
        num_full: Tensor,  # [1, 1, tiles] int32
        full: Tensor,  # [1, 1, tiles, num_pages] int32
        block_to_logical: Tensor,  # [num_pages] int32
        window: Tensor,  # [1] int64
        row_last: Tensor,  # [capacity >= packed_rows] int64
        row_prefix: Tensor,  # [capacity] int64
        row_pos: Tensor,  # [capacity] int64
        tree_rows: Tensor,  # [capacity, tree_capacity] bool
        tree_depths: Tensor,  # [capacity, tree_capacity] int64
    ) -> Tensor:  # [1, kv_heads, packed_rows * group, head_dim]
        def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            row = q_idx // group
            logical = block_to_logical[kv_idx // block_size]
            kv_pos = logical * block_size + kv_idx % block_size
            last, prefix = row_last[row], row_prefix[row]
            node = (kv_pos - prefix).clamp(0, tree_rows.shape[1] - 1)
            own = tree_rows[row, node]
            # the window's positions: a tree's own keys at prefix + their depth
            key_pos = torch.where(kv_pos < prefix, kv_pos, prefix + tree_depths[row, node])
            visible = (logical >= 0) & (kv_pos <= last) & (key_pos > row_pos[row] - window[0])
            return visible & ((kv_pos < prefix) | own)

        mask = BlockMask.from_kv_blocks(
            num_partial,
            partial,
            num_full,
            full,
            BLOCK_SIZE=(q_tile * group, block_size),
            mask_mod=mask_mod,
            seq_lengths=(query.shape[2], key.shape[2]),
            compute_q_blocks=False,
        )
        return flex_attention(query, key, value, block_mask=mask, scale=scale)

    return extend

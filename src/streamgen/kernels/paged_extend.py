"""Paged extend (prefill-chunk) attention: new tokens over cached prefix + themselves.

::

    grid = (num_seqs, num_kv_heads, cdiv(max_query_len, BLOCK_QUERY))

    sequence s, query_len new tokens, seq_len context, prefix = seq_len - query_len

    keys:   [0 ............ prefix) [prefix ........ seq_len)
             cached, always visible   the new tokens: causal (k <= prefix + i),
             (within the window)      or tree_mask[row of i, k - prefix]
                                      (a window over a tree: from prefix + depth)

A program takes ``BLOCK_QUERY`` consecutive new tokens of one sequence and
every query head of one kv head: its ``BLOCK_QUERY * BLOCK_GROUP`` rows are
(token, head) pairs, so each K/V tile loaded serves the whole GQA group.
Causal programs stop at the last key their tokens can see; tree programs scan
every new token and read the mask. Keys are gathered through the block table
per position (any block size, any block order). Online softmax in float32.

``seq_ids`` restricts the launch to some sequences of a batch (the backend
runs decodes through :mod:`~streamgen.kernels.paged_decode`); the other rows
of ``out`` are left untouched.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from streamgen.kernels.common import (
    FP8_DTYPE,
    check_kv_cache,
    check_query,
    default_tile,
    dot_dtype,
    dot_precision,
    load_paged_tile,
    min_dot_size,
    padded,
    soft_cap,
)


@triton.jit
def _paged_extend_kernel(
    output_ptr,  # [num_tokens, num_heads, head_dim]
    query_ptr,  # [num_tokens, num_heads, head_dim]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache_ptr,
    k_scale_ptr,  # [num_kv_heads] float32 (fp8 only)
    v_scale_ptr,
    block_tables_ptr,  # [num_seqs, max_blocks]
    query_start_loc_ptr,  # [num_seqs + 1]
    seq_lens_ptr,  # [num_seqs]
    seq_ids_ptr,  # [num_programs_0] sequences to compute (HAS_SEQ_IDS)
    tree_mask_ptr,  # [num_tokens, max_query_len] uint8 (HAS_TREE_MASK)
    tree_depth_ptr,  # [num_tokens] int32, each tree token's depth (HAS_TREE_MASK, HAS_WINDOW)
    scale_log2,  # softmax scale * log2(e)
    softcap_log2,  # softcap * log2(e) with HAS_SOFTCAP: cap * tanh(s / cap) in exp2 units
    sliding_window,
    stride_query_token,
    stride_query_head,
    stride_output_token,
    stride_output_head,
    stride_k_block,
    stride_k_slot,
    stride_k_head,
    stride_v_block,
    stride_v_slot,
    stride_v_head,
    stride_block_tables_seq,
    stride_tree_mask_token,
    QUERY_GROUP: tl.constexpr,
    BLOCK_GROUP: tl.constexpr,
    BLOCK_QUERY: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr,
    IS_FP8: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_TREE_MASK: tl.constexpr,
    HAS_SEQ_IDS: tl.constexpr,
):
    BLOCK_ROWS: tl.constexpr = BLOCK_QUERY * BLOCK_GROUP
    if HAS_SEQ_IDS:  # noqa: SIM108 - a compile-time branch; one side is not even compiled
        seq = tl.load(seq_ids_ptr + tl.program_id(0)).to(tl.int32)
    else:
        seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    first_token = tl.program_id(2) * BLOCK_QUERY  # within the sequence's chunk
    query_start = tl.load(query_start_loc_ptr + seq).to(tl.int32)
    query_len = tl.load(query_start_loc_ptr + seq + 1).to(tl.int32) - query_start
    seq_len = tl.load(seq_lens_ptr + seq).to(tl.int32)
    prefix_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_ROWS)
    token = first_token + rows // BLOCK_GROUP  # [BLOCK_ROWS] index in the chunk
    group = rows % BLOCK_GROUP
    heads = kv_head * QUERY_GROUP + group
    row_ok = (token < query_len) & (group < QUERY_GROUP)
    token_row = query_start + token  # flat row of the batch
    query_pos = prefix_len + token
    if HAS_TREE_MASK and HAS_WINDOW:  # a tree row sits at prefix + its depth, not its slot
        query_pos = prefix_len + tl.load(tree_depth_ptr + token_row, mask=row_ok, other=0)
    dims = tl.arange(0, BLOCK_DIM)
    dim_ok = dims < HEAD_DIM
    row_dim_ok = row_ok[:, None] & dim_ok[None, :]
    query = tl.load(
        query_ptr
        + token_row[:, None].to(tl.int64) * stride_query_token
        + heads[:, None] * stride_query_head
        + dims[None, :],
        mask=row_dim_ok,
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_ROWS, BLOCK_DIM]
    if IS_FP8:
        k_scale = tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)

    # Keys this program can need: [key_start, key_end); empty for tiles past the chunk.
    if HAS_TREE_MASK:
        key_end = seq_len
    else:
        key_end = tl.minimum(seq_len, prefix_len + first_token + BLOCK_QUERY)
    key_end = tl.where(first_token < query_len, key_end, 0)
    key_start = 0
    if HAS_WINDOW:
        if HAS_TREE_MASK:  # rows at prefix + depth >= prefix
            key_start = tl.maximum(prefix_len - sliding_window + 1, 0)
        else:
            key_start = tl.maximum(prefix_len + first_token - sliding_window + 1, 0)
    key_start = tl.minimum(key_start, key_end)

    # Rows may see nothing in a tile (tree, window edge): the finite start keeps them NaN-free.
    running_max = tl.full([BLOCK_ROWS], -1.0e30, tl.float32)
    running_sum = tl.zeros([BLOCK_ROWS], tl.float32)
    acc = tl.zeros([BLOCK_ROWS, BLOCK_DIM], tl.float32)
    block_table = block_tables_ptr + seq * stride_block_tables_seq
    for tile_start in range(key_start, key_end, TILE):
        positions = tile_start + tl.arange(0, TILE)  # [TILE]
        valid = positions < key_end
        block_ids = tl.load(block_table + positions // BLOCK_SIZE, mask=valid, other=0)
        keys = load_paged_tile(
            k_cache_ptr, block_ids, positions, valid, kv_head, dims, dim_ok,
            stride_k_block, stride_k_slot, stride_k_head, BLOCK_SIZE,
        )  # fmt: skip
        if IS_FP8:
            keys = keys * k_scale
        scores = tl.dot(query, tl.trans(keys.to(DOT_DTYPE)), input_precision=DOT_PRECISION)
        visible = row_ok[:, None] & valid[None, :]  # [BLOCK_ROWS, TILE]
        if HAS_TREE_MASK:
            is_new = positions >= prefix_len
            tree_bits = tl.load(
                tree_mask_ptr
                + token_row[:, None].to(tl.int64) * stride_tree_mask_token
                + (positions - prefix_len)[None, :],
                mask=visible & is_new[None, :],
                other=0,
            )
            visible = visible & ((positions < prefix_len)[None, :] | (tree_bits != 0))
        else:
            visible = visible & (positions[None, :] <= query_pos[:, None])
        if HAS_WINDOW:
            key_pos = positions
            if HAS_TREE_MASK:  # the tree's own keys sit at prefix + their depths
                own = positions >= prefix_len
                key_depth = tl.load(
                    tree_depth_ptr + query_start + (positions - prefix_len),
                    mask=valid & own,
                    other=0,
                )
                key_pos = tl.where(own, prefix_len + key_depth, positions)
            visible = visible & (key_pos[None, :] > query_pos[:, None] - sliding_window)
        scores = scores * scale_log2
        if HAS_SOFTCAP:  # on the scaled scores, before the mask (cap in log2(e) units too)
            scores = soft_cap(scores, softcap_log2)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        probs = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(running_max - new_max)
        values = load_paged_tile(
            v_cache_ptr, block_ids, positions, valid, kv_head, dims, dim_ok,
            stride_v_block, stride_v_slot, stride_v_head, BLOCK_SIZE,
        )  # fmt: skip
        if IS_FP8:
            values = values * v_scale
        acc = acc * rescale[:, None] + tl.dot(
            probs.to(DOT_DTYPE), values.to(DOT_DTYPE), input_precision=DOT_PRECISION
        )
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        running_max = new_max

    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    tl.store(
        output_ptr
        + token_row[:, None].to(tl.int64) * stride_output_token
        + heads[:, None] * stride_output_head
        + dims[None, :],
        out.to(output_ptr.dtype.element_ty),
        mask=row_dim_ok,
    )


def paged_extend_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32/int64
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32/int64
    seq_lens: torch.Tensor,  # [num_seqs] int32/int64, context including the new tokens
    scale: float,
    *,
    max_query_len: int | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
    seq_ids: torch.Tensor | None = None,  # [num_selected] int, sequences to compute
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32, fp8 caches only
    v_scale: torch.Tensor | None = None,
    query_tile: int | None = None,
    tile_size: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim] in query.dtype
    """Attention of every new token over its sequence's cached prefix and new tokens.

    The new K/V must already be in the cache (at positions ``prefix ..
    seq_len - 1``). Without ``tree_mask`` the new tokens are causal; with it,
    token ``i`` sees new token ``j`` iff ``tree_mask[row of i, j]`` (the prefix
    is always visible). ``max_query_len`` sizes the grid; pass it to avoid a
    device-to-host sync. With ``seq_ids``, only those sequences' rows of
    ``out`` are written.

    Two sequences: 3 new tokens after a 17-token prefix, and a fresh 2-token prompt.

    Example (on a GPU)::

        q = torch.randn(5, 8, 64, device="cuda", dtype=torch.bfloat16)
        k_cache = torch.randn(10, 16, 2, 64, device="cuda", dtype=torch.bfloat16)
        tables = torch.tensor([[3, 7], [9, 1]], device="cuda")
        starts = torch.tensor([0, 3, 5], device="cuda")
        lens = torch.tensor([20, 2], device="cuda")
        out = paged_extend_attention(q, k_cache, k_cache, tables, starts, lens, 0.125)
        out.shape  # torch.Size([5, 8, 64])
    """
    group = check_query(query, k_cache)
    k_scale, v_scale = check_kv_cache(k_cache, v_cache, k_scale, v_scale)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1; got {sliding_window}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0; got {softcap}")
    num_tokens, _, head_dim = query.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    device = query.device
    output = torch.empty_like(query) if out is None else out
    num_seqs = seq_lens.shape[0] if seq_ids is None else seq_ids.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return output
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max())
    block_group = triton.next_power_of_2(group)
    tile = tile_size or default_tile(k_cache.dtype, device)
    # GPU: about `tile` rows (tokens x heads) per program; interpreter: 16 tokens, few programs.
    block_query = query_tile or (max(1, tile // block_group) if device.type == "cuda" else 16)
    block_query = max(triton.next_power_of_2(block_query), min_dot_size(device) // block_group)
    depths = seq_lens  # placeholder pointer, read only for a window over a tree
    if tree_mask is None:
        mask_bytes, mask_stride = query, 0  # placeholder pointer, never read
    else:
        if tree_mask.shape[0] != num_tokens or tree_mask.dtype != torch.bool:
            raise ValueError(f"tree_mask must be bool [{num_tokens}, max_query_len]")
        mask_bytes = tree_mask.view(torch.uint8)
        mask_stride = mask_bytes.stride(0)
        if sliding_window is not None:  # a node's depth: its ancestors, less one
            depths = (tree_mask.sum(-1, dtype=torch.int32) - 1).contiguous()
    operand_dtype = dot_dtype(k_cache.dtype, device)
    grid = (num_seqs, num_kv_heads, math.ceil(max_query_len / block_query))
    _paged_extend_kernel[grid](
        output,
        query,
        k_cache,
        v_cache,
        k_scale,
        v_scale,
        block_tables,
        query_start_loc,
        seq_lens,
        seq_lens if seq_ids is None else seq_ids,
        mask_bytes,
        depths,
        scale * math.log2(math.e),
        (softcap or 0.0) * math.log2(math.e),
        sliding_window or 0,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        mask_stride,
        QUERY_GROUP=group,
        BLOCK_GROUP=block_group,
        BLOCK_QUERY=block_query,
        HEAD_DIM=head_dim,
        BLOCK_DIM=padded(head_dim, device),
        BLOCK_SIZE=block_size,
        TILE=tile,
        IS_FP8=k_cache.dtype == FP8_DTYPE,
        DOT_DTYPE=operand_dtype,
        DOT_PRECISION=dot_precision(operand_dtype),
        HAS_WINDOW=sliding_window is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_TREE_MASK=tree_mask is not None,
        HAS_SEQ_IDS=seq_ids is not None,
    )
    return output

"""Pure-torch references of the kernels in this package (no triton).

Written for clarity, not speed: one Python iteration per sequence, explicit
masks, float32 softmax. They are the oracles of the kernel tests and are
themselves checked against :class:`~streamgen.attention.torch_ref.TorchReferenceBackend`.

Visibility of key position ``k`` for new token ``i`` of a sequence with
``query_len`` new tokens and ``seq_len`` context (``prefix = seq_len - query_len``)::

    causal:  k <= prefix + i                      (bottom-right aligned)
    window:  and k > prefix + i - sliding_window
    tree:    k < prefix, or tree_mask[row of i, k - prefix]
    window over a tree: positions are prefix + depth (a node's ancestors, less one),
             for the row and for its ancestors among the keys
"""

from __future__ import annotations

import torch

from streamgen.kernels.common import FP8_DTYPE, FP8_MAX


def quantize_fp8_reference(
    x: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    scale: torch.Tensor,  # [num_kv_heads] float32
) -> torch.Tensor:  # [num_tokens, num_kv_heads, head_dim] float8_e4m3fn
    """``x / scale`` per kv head, saturated to +-448 and rounded to float8_e4m3fn.

    >>> quantize_fp8_reference(torch.full((1, 1, 2), 3.0), torch.tensor([2.0])).float()
    tensor([[[1.5000, 1.5000]]])
    """
    return (x.float() / scale[None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_reference(
    cache: torch.Tensor,  # [..., num_kv_heads, head_dim], any cache dtype
    scale: torch.Tensor | None,  # [num_kv_heads] float32 for fp8 caches, else None
) -> torch.Tensor:  # same shape, float32
    """The float32 values a kernel reads from ``cache``."""
    values = cache.float()
    return values * scale[:, None] if cache.dtype == FP8_DTYPE and scale is not None else values


def reshape_and_cache_reference(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim], written in place
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int, -1 skips the token
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32, fp8 caches only
    v_scale: torch.Tensor | None = None,
) -> None:
    """Store token ``t`` at slot ``slot_mapping[t]`` of the flat ``[slots, heads, dim]`` cache view.

    >>> cache = torch.zeros(2, 4, 1, 2)
    >>> rows = torch.ones(1, 1, 2)
    >>> reshape_and_cache_reference(rows, rows, cache, cache.clone(), torch.tensor([5]))
    >>> cache.view(-1, 1, 2)[5].tolist()
    [[1.0, 1.0]]
    """
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    for source, cache, scale in ((key, k_cache, k_scale), (value, v_cache, v_scale)):
        rows = source[keep]
        if cache.dtype == FP8_DTYPE:
            if scale is None:
                raise ValueError("float8_e4m3fn caches need a per-head scale")
            rows = quantize_fp8_reference(rows, scale)
        flat = cache.view(-1, cache.shape[2], cache.shape[3])  # [num_slots, kv_heads, head_dim]
        flat[slots] = rows.to(cache.dtype)


def paged_attention_reference(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int, cumulative query lengths
    seq_lens: torch.Tensor,  # [num_seqs] int, context length including the new tokens
    scale: float,
    *,
    sliding_window: int | None = None,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
    k_scale: torch.Tensor | None = None,  # [num_kv_heads] float32, fp8 caches only
    v_scale: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim] in query.dtype
    """Attention of every new token over its sequence's paged context (``softcap``: the
    scaled scores capped to ``cap * tanh(s / cap)`` before the mask, Gemma 2's).

    >>> k = torch.randn(4, 2, 1, 8); v = torch.randn(4, 2, 1, 8)   # 4 blocks of 2 slots
    >>> q = torch.randn(3, 2, 8)                                   # 3 new tokens, 2 heads
    >>> out = paged_attention_reference(
    ...     q, k, v, torch.tensor([[3, 1, 0]]), torch.tensor([0, 3]), torch.tensor([5]), 0.35)
    >>> out.shape
    torch.Size([3, 2, 8])
    """
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = query.shape[1] // num_kv_heads
    output = torch.empty_like(query)
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    for seq, seq_len in enumerate(lens):
        first, last = starts[seq], starts[seq + 1]
        query_len = last - first
        positions = torch.arange(seq_len, device=query.device)
        slots = block_tables[seq, positions // block_size] * block_size + positions % block_size
        keys = dequantize_reference(
            k_cache.view(-1, num_kv_heads, k_cache.shape[3])[slots], k_scale
        )
        values = dequantize_reference(
            v_cache.view(-1, num_kv_heads, v_cache.shape[3])[slots], v_scale
        )
        keys = keys.repeat_interleave(group, dim=1)  # [seq_len, num_heads, head_dim]
        values = values.repeat_interleave(group, dim=1)
        visible = _visible(
            seq_len,
            query_len,
            sliding_window,
            None if tree_mask is None else tree_mask[first:last, :query_len],
        )  # [query_len, seq_len]
        scores = torch.einsum("qhd,khd->hqk", query[first:last].float(), keys) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
        output[first:last] = torch.einsum("hqk,khd->qhd", probs, values).to(query.dtype)
    return output


def paged_decode_reference(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim], one new token per sequence
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int
    seq_lens: torch.Tensor,  # [num_seqs] int
    scale: float,
    *,
    sliding_window: int | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """:func:`paged_attention_reference` with one query token per sequence."""
    query_start_loc = torch.arange(query.shape[0] + 1, device=query.device)
    return paged_attention_reference(
        query,
        k_cache,
        v_cache,
        block_tables,
        query_start_loc,
        seq_lens,
        scale,
        sliding_window=sliding_window,
        k_scale=k_scale,
        v_scale=v_scale,
        softcap=softcap,
    )


def _visible(
    seq_len: int,
    query_len: int,
    sliding_window: int | None,
    tree_rows: torch.Tensor | None,  # [query_len, query_len] bool
) -> torch.Tensor:  # [query_len, seq_len] bool
    prefix = seq_len - query_len
    query_pos = prefix + torch.arange(query_len)[:, None]
    key_pos = torch.arange(seq_len)[None, :]
    if tree_rows is not None:
        rows = tree_rows.cpu()
        own = torch.zeros(query_len, seq_len, dtype=torch.bool)
        own[:, prefix:] = rows
        visible = (key_pos < prefix) | own
        if sliding_window is not None:  # positions: prefix + depth, the rows' and the keys'
            depth = rows.sum(-1) - 1  # [query_len]
            query_pos = prefix + depth[:, None]
            key_pos = torch.cat([torch.arange(prefix), prefix + depth])[None, :]
            visible &= key_pos > query_pos - sliding_window
        return visible.to(tree_rows.device)
    visible = key_pos <= query_pos
    if sliding_window is not None:
        visible &= key_pos > query_pos - sliding_window
    return visible

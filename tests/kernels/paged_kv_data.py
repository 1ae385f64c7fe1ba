"""Builders of paged-KV test data: caches, scattered block tables, token trees, metadata."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamgen.attention.backend import AttentionMetadata
from streamgen.kernels.reference import quantize_fp8_reference

FP8 = torch.float8_e4m3fn


@dataclass(frozen=True)
class PagedCache:
    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    k_scale: torch.Tensor | None  # [num_kv_heads] float32 for fp8 caches
    v_scale: torch.Tensor | None


def make_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    generator: torch.Generator,
) -> PagedCache:
    """Random caches; fp8 ones hold quantized N(0, 1) data with per-head scales in [0.5, 2)."""
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    values = [torch.randn(shape, generator=generator) for _ in range(2)]
    if dtype != FP8:
        k, v = (x.to(dtype).to(device) for x in values)
        return PagedCache(k, v, None, None)
    scales = [0.5 + 1.5 * torch.rand(num_kv_heads, generator=generator) for _ in range(2)]
    k, v = (
        quantize_fp8_reference(x.view(-1, num_kv_heads, head_dim), s).view(shape).to(device)
        for x, s in zip(values, scales, strict=True)
    )
    return PagedCache(k, v, scales[0].to(device), scales[1].to(device))


def scattered_block_tables(
    seq_lens: list[int],
    block_size: int,
    num_blocks: int,
    generator: torch.Generator,
) -> torch.Tensor:  # [num_seqs, max_blocks] int64, padded with 0
    """Each sequence gets distinct physical blocks drawn from a shuffled pool, so
    logical neighbours are (almost always) not physical neighbours."""
    needed = [-(-length // block_size) for length in seq_lens]
    if sum(needed) > num_blocks:
        raise ValueError(f"{sum(needed)} blocks needed, {num_blocks} in the pool")
    pool = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.zeros(len(seq_lens), max(needed), dtype=torch.int64)
    for seq, count in enumerate(needed):
        tables[seq, :count] = torch.tensor(pool[:count])
        pool = pool[count:]
    return tables


def query_start_loc(query_lens: list[int]) -> torch.Tensor:  # [num_seqs + 1] int64
    starts = [0]
    for length in query_lens:
        starts.append(starts[-1] + length)
    return torch.tensor(starts)


def random_tree_mask(
    query_lens: list[int],
    tree_seqs: set[int],
    generator: torch.Generator,
) -> torch.Tensor:  # [num_tokens, max_query_len] bool
    """Token ``i > 0`` of a tree sequence hangs under a random earlier token and
    sees itself and its ancestors; other sequences get the causal triangle."""
    mask = torch.zeros(sum(query_lens), max(query_lens), dtype=torch.bool)
    row = 0
    for seq, length in enumerate(query_lens):
        for i in range(length):
            if seq in tree_seqs and i > 0:
                parent = int(torch.randint(0, i, (1,), generator=generator))
                mask[row + i] = mask[row + parent]
                mask[row + i, i] = True
            elif seq in tree_seqs:
                mask[row, 0] = True
            else:
                mask[row + i, : i + 1] = True
        row += length
    return mask


def make_metadata(
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int64
    seq_lens: list[int],
    query_lens: list[int],
    block_size: int,
    *,
    sliding_window: int | None = None,
    tree_mask: torch.Tensor | None = None,  # [num_tokens, max_query_len] bool
) -> AttentionMetadata:
    """The step metadata a runner would build: new token i of sequence b sits at
    position ``seq_lens[b] - query_lens[b] + i`` and writes to that position's slot."""
    device = block_tables.device
    slots = []
    for seq, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens, strict=True)):
        for position in range(seq_len - query_len, seq_len):
            block = int(block_tables[seq, position // block_size])
            slots.append(block * block_size + position % block_size)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=query_start_loc(query_lens).to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int64, device=device),
        block_tables=block_tables,
        query_lens_list=tuple(query_lens),
        seq_lens_list=tuple(seq_lens),
        block_size=block_size,
        sliding_window=sliding_window,
        tree_mask=tree_mask,
    )


def tree_rows_by_torch_backend(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,
    metadata: AttentionMetadata,  # with tree_mask
    rows: list[int],  # flat query rows to compute
    scale: float,
) -> torch.Tensor:  # [len(rows), num_heads, head_dim]
    """Attention of tree rows computed by TorchReferenceBackend, without its tree support.

    Viewing the cache with one slot per block, any set of slots is a block
    table: row t becomes a one-token decode whose context is exactly the slots
    it may see (the prefix, then the new tokens its tree_mask row selects).
    """
    from streamgen.attention.torch_ref import TorchReferenceBackend

    assert metadata.tree_mask is not None
    starts = query_start_loc(list(metadata.query_lens_list)).tolist()
    tables = []
    for row in rows:
        seq = max(b for b in range(metadata.num_seqs) if starts[b] <= row)
        seq_len, query_len = metadata.seq_lens_list[seq], metadata.query_lens_list[seq]
        prefix = seq_len - query_len
        seen = list(range(prefix))
        seen += [prefix + j for j in range(query_len) if metadata.tree_mask[row, j]]
        positions = torch.tensor(seen)
        table = metadata.block_tables[seq].cpu()
        tables.append(
            table[positions // metadata.block_size] * metadata.block_size
            + positions % metadata.block_size
        )
    lens = [len(t) for t in tables]
    slot_tables = torch.zeros(len(rows), max(lens), dtype=torch.int64)
    for i, table in enumerate(tables):
        slot_tables[i, : lens[i]] = table
    one_slot_blocks = (-1, 1, *k_cache.shape[2:])
    decode = make_metadata(slot_tables.to(k_cache.device), lens, [1] * len(rows), block_size=1)
    return TorchReferenceBackend().attend(
        query[rows],
        k_cache.view(one_slot_blocks),
        v_cache.view(one_slot_blocks),
        decode,
        scale,
    )

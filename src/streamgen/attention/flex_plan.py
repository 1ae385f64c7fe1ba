"""Per-step plans of the flex backend: which query rows go to which flex call,
and which KV pages each query tile reads (FlexAttention's ``BlockMask`` lists).

Two layouts, one flex call each (see ``flex.py`` for the diagrams):

* decodes: one batch element per sequence, GQA folded into the query rows
  (``[seqs, num_kv_heads, group, head_dim]``), one tile per sequence;
* extends (chunks of a few tokens, token trees): every chunk packed into one
  batch element, each chunk padded to a multiple of ``q_tile`` tokens so that
  a tile belongs to exactly one sequence (GQA folded too: a tile has
  ``q_tile * group`` rows).

A tile lists its pages in two sets: *full* pages, which every row of the tile
sees entirely (no mask evaluated), and *partial* pages (the causal diagonal,
the last, half-written page, the sliding-window edge, a tree's own tokens),
where the mask runs. Both lists hold physical page ids: the kernel reads the
paged cache in place. Lists are ``num_pages`` wide (the kernel requires
``kv_indices.shape[-1] * block_size >= kv_len``) and reused from step to step:
ids past a tile's count are stale and never read.

The mask needs a key's position in its sequence. It reads it from
``block_to_logical[page] * block_size + slot % block_size``: a physical page
holds the same logical block in every sequence that uses it (prefix sharing
and forks share a prefix, never shift it); ``block_to_logical`` verifies this
each step and reports a conflict instead of planning a wrong mask.

Invariants: every size that changes from step to step is either a dimension
the compiled call marks dynamic (sequences, tiles, rows) or rounded up to a
power-of-two capacity (the mask's lookup tables), so steady-state steps never
recompile. Padding tiles and rows have empty page lists: the kernel skips them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamgen.attention.backend import AttentionMetadata
from streamgen.attention.sub_batch import query_starts

# A window this large never excludes a key (positions are < 2**40).
NO_WINDOW = 1 << 40


@dataclass(frozen=True, slots=True)
class PageLists:
    """Pages each query tile reads, in ``BlockMask.from_kv_blocks`` layout."""

    num_partial: torch.Tensor  # [tiles] int32, pages that need the mask
    partial: torch.Tensor  # [tiles, num_pages] int32, physical ids, first num_partial valid
    num_full: torch.Tensor  # [tiles] int32, pages seen entirely by every row of the tile
    full: torch.Tensor  # [tiles, num_pages] int32


@dataclass(frozen=True, slots=True)
class DecodePlan:
    """One flex call over every decode (one new token) of the step."""

    rows: torch.Tensor  # [padded_seqs] int64, flat query row of each decode (padding -> a copy)
    num_seqs: int  # real decodes; rows[num_seqs:] are padding
    covers_batch: bool  # the step is these decodes, in order: no gather/scatter of rows
    pages: PageLists  # one tile per (padded) sequence
    query_pos: torch.Tensor  # [capacity] int64, position of each decode token (padding -1)


@dataclass(frozen=True, slots=True)
class ExtendPlan:
    """One flex call over every multi-token chunk of the step, packed tile by tile."""

    rows: torch.Tensor  # [packed_rows] int64, flat query row of each packed row (padding -> 0)
    packed_valid: torch.Tensor  # [extend_tokens] int64, packed rows that hold real tokens
    output_rows: torch.Tensor  # [extend_tokens] int64, flat rows those tokens go to
    pages: PageLists  # one tile per q_tile packed rows
    # Row i sees key position k iff k <= row_last[i] and (k < row_prefix[i] or
    # tree_rows[i, k - row_prefix[i]]), and the key is inside the window that counts
    # back from row_pos[i]. Causal rows: row_prefix = row_last + 1 and row_pos = row_last.
    # A tree row's window counts from prefix + its depth, and its own key j sits at
    # prefix + tree_depths[i, j] (what a decode of its token would see).
    row_last: torch.Tensor  # [capacity] int64
    row_prefix: torch.Tensor  # [capacity] int64
    row_pos: torch.Tensor  # [capacity] int64
    tree_rows: torch.Tensor  # [capacity, tree_capacity] bool, all False without a tree
    tree_depths: torch.Tensor  # [capacity, tree_capacity] int64, depths of the chunk's nodes


class PageListArena:
    """Reusable ``[tiles, num_pages]`` id buffers for the page lists of a step.

    The kernel reads only the first ``count`` ids of a row, so rows are never
    cleared between steps: allocating and zeroing them each step cost more than
    the rest of the plan (7 ms per list for 64 tiles x 2,912 pages).
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def take(
        self, name: str, tiles: int, num_pages: int, device: torch.device
    ) -> torch.Tensor:  # [tiles, num_pages] int32, stale ids past each row's count
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.shape[0] < tiles
            or buffer.shape[1] != num_pages
            or buffer.device != device
        ):
            buffer = torch.zeros(capacity(tiles, 64), num_pages, dtype=torch.int32, device=device)
            self._buffers[name] = buffer
        return buffer[:tiles]


def capacity(n: int, minimum: int) -> int:
    """``n`` rounded up to a power of two, at least ``minimum`` (static shapes for lookups)."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def block_to_logical(
    metadata: AttentionMetadata, num_pages: int
) -> torch.Tensor | None:  # [num_pages] int32, -1 for pages no sequence of the step uses
    """The logical block each physical page holds, or None if two sequences
    disagree (the flex masks cannot express that step)."""
    tables = metadata.block_tables  # [seqs, max_blocks]
    blocks_used = (metadata.seq_lens + metadata.block_size - 1) // metadata.block_size  # [seqs]
    logical = torch.arange(tables.shape[1], device=tables.device).expand_as(tables)
    used = logical < blocks_used[:, None]  # [seqs, max_blocks]
    pages, logical = tables[used], logical[used].to(torch.int32)  # [used_blocks]
    mapping = torch.full((num_pages,), -1, dtype=torch.int32, device=tables.device)
    mapping[pages] = logical
    if not bool((mapping[pages] == logical).all()):
        return None
    return mapping


def page_lists(
    tables: torch.Tensor,  # [tiles, max_blocks] int64, the block table of each tile's sequence
    first_pos: torch.Tensor,  # [tiles] int64, every row sees keys <= first_pos (-1: none)
    last_pos: torch.Tensor,  # [tiles] int64, no row sees keys > last_pos (-1: empty tile)
    block_size: int,
    window: int,
    arena: PageListArena,
    name: str,
    num_pages: int,
) -> PageLists:
    """Partial and full page lists of each tile.

    Rows of a tile see keys in ``(pos - window, pos]`` for some ``pos`` in
    ``[first_pos, last_pos]``. The union of what they see spans logical blocks
    ``[lo, end)``; blocks in ``[full_lo, full_hi)`` are seen entirely by every
    row (within the earliest row's causal limit and the latest row's window).
    """
    lo = (first_pos - window + 1).clamp(min=0) // block_size
    end = torch.div(last_pos, block_size, rounding_mode="floor") + 1
    lo = torch.minimum(lo, end.clamp(min=0))
    full_lo = -((-(last_pos - window + 1).clamp(min=0)) // block_size)  # ceil
    full_hi = torch.div(first_pos + 1, block_size, rounding_mode="floor")
    full_lo = torch.maximum(torch.minimum(full_lo, end), lo)
    full_hi = torch.maximum(torch.minimum(full_hi, end), full_lo)
    head = full_lo - lo  # partial blocks before the full run (the window edge)
    num_partial = head + (end - full_hi).clamp(min=0)  # [tiles]
    num_full = full_hi - full_lo  # [tiles]

    def physical(logical: torch.Tensor, kind: str) -> torch.Tensor:
        # logical: [tiles, width]; entries past a row's count are never read.
        index = logical.clamp(0, tables.shape[1] - 1)
        out = arena.take(f"{name}_{kind}", tables.shape[0], num_pages, tables.device)
        out[:, : index.shape[1]] = tables.gather(1, index)
        return out

    column = torch.arange(max(1, int(num_partial.max())), device=tables.device)[None, :]
    partial = torch.where(
        column < head[:, None], lo[:, None] + column, full_hi[:, None] + column - head[:, None]
    )
    column = torch.arange(max(1, int(num_full.max())), device=tables.device)[None, :]
    full = full_lo[:, None] + column
    return PageLists(
        num_partial=num_partial.to(torch.int32),
        partial=physical(partial, "partial"),
        num_full=num_full.to(torch.int32),
        full=physical(full, "full"),
    )


def plan_decodes(
    metadata: AttentionMetadata,
    seqs: list[int],
    window: int,
    arena: PageListArena,
    num_pages: int,
) -> DecodePlan:
    """Plan the decode call for sequences ``seqs`` (each with one new token)."""
    device = metadata.block_tables.device
    starts = query_starts(metadata)
    # At least two sequences: a dimension of size 1 would be specialised by the compiler.
    padded = seqs + seqs[:1] * max(0, 2 - len(seqs))
    rows = torch.tensor([starts[s] for s in padded], dtype=torch.int64, device=device)
    pos = torch.tensor(
        [metadata.seq_lens_list[s] - 1 for s in seqs] + [-1] * (len(padded) - len(seqs)),
        dtype=torch.int64,
        device=device,
    )
    index = torch.tensor(padded, dtype=torch.int64, device=device)
    query_pos = torch.full((capacity(len(padded), 64),), -1, dtype=torch.int64, device=device)
    query_pos[: len(padded)] = pos
    return DecodePlan(
        rows=rows,
        num_seqs=len(seqs),
        covers_batch=seqs == list(range(metadata.num_seqs)) and len(seqs) >= 2,
        pages=page_lists(
            metadata.block_tables[index],
            pos,
            pos,
            metadata.block_size,
            window,
            arena,
            "decode",
            num_pages,
        ),
        query_pos=query_pos,
    )


def plan_extends(
    metadata: AttentionMetadata,
    seqs: list[int],
    window: int,
    q_tile: int,
    arena: PageListArena,
    num_pages: int,
) -> ExtendPlan:
    """Plan the packed extend call for sequences ``seqs`` (chunks of several tokens)."""
    device = metadata.block_tables.device
    starts = query_starts(metadata)
    q_lens = torch.tensor([metadata.query_lens_list[s] for s in seqs], dtype=torch.int64)
    s_lens = torch.tensor([metadata.seq_lens_list[s] for s in seqs], dtype=torch.int64)
    first_row = torch.tensor([starts[s] for s in seqs], dtype=torch.int64)
    prefix = s_lens - q_lens  # [extends]
    tiles_per_seq = -(-q_lens // q_tile)  # [extends]
    num_tiles = int(tiles_per_seq.sum())
    tile_seq = torch.repeat_interleave(torch.arange(len(seqs)), tiles_per_seq)  # [tiles]
    tile_start = torch.cumsum(tiles_per_seq, 0) - tiles_per_seq  # [extends]
    tile_offset = (torch.arange(num_tiles) - tile_start[tile_seq]) * q_tile  # [tiles]

    # Rows of the packed query: tile t holds tokens tile_offset[t] .. + q_tile of its chunk.
    row_tile = torch.arange(num_tiles * q_tile) // q_tile  # [rows]
    row_seq = tile_seq[row_tile]
    offset = tile_offset[row_tile] + torch.arange(num_tiles * q_tile) % q_tile  # [rows]
    valid = offset < q_lens[row_seq]  # [rows]
    rows = torch.where(valid, first_row[row_seq] + offset, 0)
    # Causal tiles: row i sees keys up to its own position.
    tile_first = prefix[tile_seq] + tile_offset
    tile_last = torch.minimum(tile_first + q_tile - 1, s_lens[tile_seq] - 1)
    row_last = torch.minimum(prefix[row_seq] + offset, s_lens[row_seq] - 1)
    row_prefix = row_last + 1
    row_pos = row_last
    is_tree = _tree_chunks(metadata, seqs, starts)  # [extends] bool
    if bool(is_tree.any()):
        # Tree rows see the whole prefix and, as the tree says, their chunk's new tokens;
        # the window counts from each node's depth (the page lists stay a superset: a
        # node's position prefix + depth is in [prefix, s_len - 1]).
        tile_tree, row_tree = is_tree[tile_seq], is_tree[row_seq]
        tile_first = torch.where(tile_tree, prefix[tile_seq] - 1, tile_first)
        tile_last = torch.where(tile_tree, s_lens[tile_seq] - 1, tile_last)
        row_last = torch.where(row_tree, s_lens[row_seq] - 1, row_last)
        row_prefix = torch.where(row_tree, prefix[row_seq], row_prefix)
        depths = _token_depths(metadata)  # [num_tokens]
        row_pos = torch.where(row_tree, prefix[row_seq] + depths[rows], row_pos)
        tree_width = int(q_lens[is_tree].max())
        valid_tree = valid & row_tree
    else:
        tree_width, valid_tree, depths = 0, torch.zeros_like(valid), None

    # At least two tiles: a dimension of size 1 would be specialised by the compiler.
    extra = max(0, 2 - num_tiles)
    pad_pos = torch.full((extra,), -1, dtype=torch.int64)
    tables = metadata.block_tables[torch.tensor(seqs, device=device)[tile_seq.to(device)]]
    tables = torch.cat([tables, tables[:1].expand(extra, -1)])
    pages = page_lists(
        tables,
        torch.cat([tile_first, pad_pos]).to(device),
        torch.cat([tile_last, pad_pos]).to(device),
        metadata.block_size,
        window,
        arena,
        "extend",
        num_pages,
    )
    rows = torch.cat([rows, torch.zeros(extra * q_tile, dtype=torch.int64)])
    row_capacity = capacity(len(rows), 1024)
    packed_valid = valid.nonzero().view(-1)
    return ExtendPlan(
        rows=rows.to(device),
        packed_valid=packed_valid.to(device),
        output_rows=rows[packed_valid].to(device),
        pages=pages,
        row_last=_padded(row_last, row_capacity, -1).to(device),
        row_prefix=_padded(row_prefix, row_capacity, 0).to(device),
        row_pos=_padded(row_pos, row_capacity, -1).to(device),
        tree_rows=_tree_rows(metadata, rows[: len(valid)], valid_tree, tree_width, row_capacity),
        tree_depths=_tree_depths(
            depths, first_row[row_seq], q_lens[row_seq], valid_tree, tree_width, row_capacity
        ).to(device),
    )


def _tree_chunks(
    metadata: AttentionMetadata, seqs: list[int], starts: list[int]
) -> torch.Tensor:  # [extends] bool
    """Which chunks are real trees; causal chunks of a tree step keep causal plans."""
    tree_mask = metadata.tree_mask  # [num_tokens, max_query_len] or None
    if tree_mask is None:
        return torch.zeros(len(seqs), dtype=torch.bool)
    flags = []
    for s in seqs:
        q_len = metadata.query_lens_list[s]
        block = tree_mask[starts[s] : starts[s] + q_len, :q_len].cpu()
        flags.append(not torch.equal(block, torch.ones_like(block).tril()))
    return torch.tensor(flags, dtype=torch.bool)


def _tree_rows(
    metadata: AttentionMetadata,
    rows: torch.Tensor,  # [packed_rows] int64, flat row of each packed row
    valid_tree: torch.Tensor,  # [packed_rows] bool, rows of tree chunks
    tree_width: int,  # longest tree chunk (0: no tree)
    row_capacity: int,
) -> torch.Tensor:  # [row_capacity, tree_capacity] bool
    device = metadata.slot_mapping.device
    # 32 columns cover the usual draft trees: a bigger tree recompiles once.
    out = torch.zeros(row_capacity, capacity(tree_width, 32), dtype=torch.bool, device=device)
    if metadata.tree_mask is not None and tree_width:
        picked = metadata.tree_mask[rows.to(device), :tree_width]  # [packed_rows, tree_width]
        out[: len(rows), :tree_width] = picked & valid_tree[:, None].to(device)
    return out


def _token_depths(metadata: AttentionMetadata) -> torch.Tensor:  # [num_tokens] int64
    """Each new token's depth in its chunk's tree (its ancestors: the mask row's count
    less itself; a causal chunk's token i has depth i)."""
    assert metadata.tree_mask is not None
    return metadata.tree_mask.sum(-1).cpu() - 1


def _tree_depths(
    depths: torch.Tensor | None,  # [num_tokens] int64, or None without a tree
    first: torch.Tensor,  # [packed_rows] int64, flat row of each packed row's chunk start
    q_lens: torch.Tensor,  # [packed_rows] int64, that chunk's length
    valid_tree: torch.Tensor,  # [packed_rows] bool, rows of tree chunks
    tree_width: int,
    row_capacity: int,
) -> torch.Tensor:  # [row_capacity, tree_capacity] int64
    """Row i's column j: the depth of node j of row i's chunk (tree rows; else 0)."""
    out = torch.zeros(row_capacity, capacity(tree_width, 32), dtype=torch.int64)
    if depths is not None and tree_width:
        j = torch.arange(tree_width)
        node = (first[:, None] + j).clamp(max=len(depths) - 1)  # [packed_rows, tree_width]
        inside = valid_tree[:, None] & (j < q_lens[:, None])
        out[: len(first), :tree_width] = torch.where(inside, depths[node], 0)
    return out


def _padded(values: torch.Tensor, size: int, fill: int) -> torch.Tensor:  # [size]
    out = torch.full((size,), fill, dtype=values.dtype)
    out[: len(values)] = values
    return out

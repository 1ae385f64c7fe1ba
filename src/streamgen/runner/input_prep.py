"""Turn a plain :class:`ModelBatch` into the step's tensors.

All index arithmetic happens here, once per step, on host lists; the model
and attention backends only see tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamgen.attention.backend import AttentionMetadata
from streamgen.errors import InvalidPromptError
from streamgen.runner.batch import ModelBatch, SequenceChunk


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    metadata: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sampled] int64, rows whose logits are needed
    sample_chunk_indices: tuple[int, ...]  # which chunks sample, in batch order
    # Rows of sample_rows per sampling chunk: 1, or 1 + tree size for a tree chunk.
    sample_row_counts: tuple[int, ...] = ()


def prepare_inputs(
    batch: ModelBatch,
    block_size: int,
    num_blocks: int,
    vocab_size: int,
    device: torch.device,
    sliding_window: int | None = None,
) -> StepInputs:
    """Flatten the batch; validate token ids and that every block table covers its tokens.

    Validation runs on the host lists, so it never waits on the device.
    """
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    query_start_loc = [0]
    sample_rows: list[int] = []
    sample_chunks: list[int] = []
    sample_row_counts: list[int] = []
    trees: list[tuple[int, SequenceChunk]] = []  # (first row, chunk)
    max_blocks = max((len(c.block_table) for c in batch.chunks), default=1)
    block_tables: list[list[int]] = []
    for index, chunk in enumerate(batch.chunks):
        check_chunk(chunk, block_size, num_blocks, vocab_size)
        table = list(chunk.block_table)
        first_row = len(input_ids)
        input_ids.extend(chunk.token_ids)
        for pos in range(chunk.start_pos, chunk.end_pos):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
        if chunk.tree is None:
            positions.extend(range(chunk.start_pos, chunk.end_pos))
        else:
            if len(chunk.tree) + 1 != chunk.num_tokens:
                raise InvalidPromptError(
                    f"request {chunk.request_id!r}: a tree chunk holds the root and "
                    f"{len(chunk.tree)} nodes, got {chunk.num_tokens} tokens"
                )
            positions.extend(chunk.start_pos + d for d in chunk.tree.position_offsets())
            trees.append((first_row, chunk))
        query_start_loc.append(len(input_ids))
        block_tables.append(table + [0] * (max_blocks - len(table)))
        if chunk.sampling is not None:
            num_rows = 1 if chunk.tree is None else chunk.num_tokens
            sample_rows.extend(range(len(input_ids) - num_rows, len(input_ids)))
            sample_row_counts.append(num_rows)
            sample_chunks.append(index)

    branching = any(chunk.tree is not None and not chunk.tree.is_chain for _, chunk in trees)

    def as_tensor(values: list[int] | list[list[int]]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    metadata = AttentionMetadata(
        slot_mapping=as_tensor(slots),
        query_start_loc=as_tensor(query_start_loc),
        seq_lens=as_tensor([c.end_pos for c in batch.chunks]),
        block_tables=as_tensor(block_tables),
        query_lens_list=tuple(c.num_tokens for c in batch.chunks),
        seq_lens_list=tuple(c.end_pos for c in batch.chunks),
        block_size=block_size,
        sliding_window=sliding_window,
        # A chain's rows see what a causal chunk's see: only a branching tree needs the
        # mask (and only it has rows whose slot is not their position).
        tree_mask=_tree_mask(batch, trees, len(input_ids), device) if branching else None,
    )
    return StepInputs(
        input_ids=as_tensor(input_ids),
        positions=as_tensor(positions),
        metadata=metadata,
        sample_rows=as_tensor(sample_rows),
        sample_chunk_indices=tuple(sample_chunks),
        sample_row_counts=tuple(sample_row_counts),
    )


def check_chunk(chunk: SequenceChunk, block_size: int, num_blocks: int, vocab_size: int) -> None:
    """Raise :class:`InvalidPromptError` unless the chunk has tokens, its tokens
    are in the vocabulary and its block table covers them with valid block ids."""
    needed = -(-chunk.end_pos // block_size)
    if chunk.num_tokens == 0 or len(chunk.block_table) < needed:
        raise InvalidPromptError(
            f"request {chunk.request_id!r}: {chunk.num_tokens} tokens at position "
            f"{chunk.start_pos} need {needed} blocks, block table has {len(chunk.block_table)}"
        )
    if any(b < 0 or b >= num_blocks for b in chunk.block_table):
        raise InvalidPromptError(f"request {chunk.request_id!r}: block id out of range")
    if min(chunk.token_ids) < 0 or max(chunk.token_ids) >= vocab_size:
        raise InvalidPromptError(
            f"request {chunk.request_id!r}: token id outside the vocabulary [0, {vocab_size})"
        )


def _tree_mask(
    batch: ModelBatch,
    trees: list[tuple[int, SequenceChunk]],
    num_tokens: int,
    device: torch.device,
) -> torch.Tensor:  # [num_tokens, max_query_len] bool
    """Causal (lower-triangular) blocks for plain chunks, tree visibility for tree chunks."""
    max_q = max(c.num_tokens for c in batch.chunks)
    mask = torch.zeros(num_tokens, max_q, dtype=torch.bool)
    row = 0
    for chunk in batch.chunks:
        n = chunk.num_tokens
        mask[row : row + n, :n] = torch.ones(n, n, dtype=torch.bool).tril_()
        row += n
    for first_row, chunk in trees:
        assert chunk.tree is not None
        n = chunk.num_tokens
        mask[first_row : first_row + n, :n] = torch.tensor(chunk.tree.visibility())
    return mask.to(device)

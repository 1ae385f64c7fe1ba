"""Some chunks of a step as a batch of their own, for a second backend in the same step.

A backend that takes only some chunks of a step (flex: decodes; native: short
chunks) hands the rest to another one (the torch reference) as a
:class:`SubBatch`: the chunks' own metadata over the same cache and slots,
and the flat rows their tokens occupy in the step::

    step rows:  | decode | decode | 300-token prefill chunk | decode |
    sub-batch:                     rows 2 .. 301, its own AttentionMetadata
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from streamgen.attention.backend import AttentionBackend, AttentionMetadata


@dataclass(frozen=True, slots=True)
class SubBatch:
    """Some chunks of a step as a batch of their own (for another backend)."""

    metadata: AttentionMetadata
    rows: torch.Tensor  # [sub_tokens] int64, flat rows of the chunks' tokens, in order


def sub_batch(metadata: AttentionMetadata, seqs: list[int]) -> SubBatch:
    """The chunks ``seqs`` of ``metadata`` with their own metadata (same cache, same slots)."""
    device = metadata.block_tables.device
    starts = query_starts(metadata)
    rows = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in seqs]).to(device)
    q_lens = [metadata.query_lens_list[s] for s in seqs]
    query_start_loc = torch.tensor([0, *q_lens], dtype=torch.int64).cumsum(0).to(device)
    index = torch.tensor(seqs, dtype=torch.int64, device=device)
    tree_mask = metadata.tree_mask
    return SubBatch(
        metadata=AttentionMetadata(
            slot_mapping=metadata.slot_mapping[rows],
            query_start_loc=query_start_loc,
            seq_lens=metadata.seq_lens[index],
            block_tables=metadata.block_tables[index],
            query_lens_list=tuple(q_lens),
            seq_lens_list=tuple(metadata.seq_lens_list[s] for s in seqs),
            block_size=metadata.block_size,
            sliding_window=metadata.sliding_window,
            logit_softcap=metadata.logit_softcap,
            tree_mask=None if tree_mask is None else tree_mask[rows.to(tree_mask.device)],
        ),
        rows=rows,
    )


def query_starts(metadata: AttentionMetadata) -> list[int]:
    """The first flat row of every sequence's chunk, and the total: ``[0, q0, q0 + q1, ...]``."""
    starts = [0]
    for q_len in metadata.query_lens_list:
        starts.append(starts[-1] + q_len)
    return starts


def attend_sub_batch(
    backend: AttentionBackend,
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], the whole step's
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    sub: SubBatch,
    scale: float,
    output: torch.Tensor,  # [num_tokens, num_heads, head_dim], the sub-batch's rows written
) -> None:
    """Attend the rows of ``sub`` with ``backend`` and put them in place in ``output``."""
    out = backend.attend(query.index_select(0, sub.rows), k_cache, v_cache, sub.metadata, scale)
    output.index_copy_(0, sub.rows, out)

"""Verification of draft trees against the target model's logits (torch side).

For each tree chunk the runner computed logits at every row (root + nodes).
Each row is sampled exactly as the request would be at that point: its
penalties and min_tokens see the request's output *plus the row's path*,
a seeded request's noise is drawn for the row's output position, and a constrained
request's row is masked by its grammar's state after that path. Then
:func:`streamgen.spec.acceptance.accept_path` walks the tree, and the
accepted nodes' K/V are moved from their tree slots to their final slots::

    slots:  start  start+1  start+2  start+3      accepted nodes (1, 2) -> depth 1, 2
            root   node0    node1    node2
                   ^ rejected  \\________\\___ move node1 -> start+1, node2 -> start+2
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from streamgen.runner.batch import SamplingRequest, SequenceChunk
from streamgen.runner.sampler import Sampler
from streamgen.spec.acceptance import Acceptance, accept_path


@dataclass(frozen=True, slots=True)
class VerifiedTree:
    """One tree's outcome: what it emits, with each emitted token's logprobs."""

    request_id: str
    acceptance: Acceptance
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]]


def row_requests(chunk: SequenceChunk) -> list[SamplingRequest]:
    """The sampling view of every row of a tree chunk (root first)."""
    assert chunk.tree is not None and chunk.sampling is not None
    base = chunk.sampling
    tree = chunk.tree
    rows = [base]
    allowed = chunk.tree_allowed or [None] * len(tree)  # structured outputs: node masks
    for node in range(len(tree)):
        path = [tree.tokens[n] for n in tree.path_to(node)]
        rows.append(SamplingRequest(
            base.params, base.prompt_token_ids, (*base.output_token_ids, *path), allowed[node]
        ))  # fmt: skip
    return rows


def verify_trees(
    logits: torch.Tensor,  # [sum of rows, vocab], the tree chunks' rows in order
    chunks: Sequence[SequenceChunk],
    sampler: Sampler,
) -> list[VerifiedTree]:
    """Accept the longest valid path plus one token of every tree chunk."""
    requests = [r for chunk in chunks for r in row_requests(chunk)]
    drawn = sampler.sample(logits, requests)
    verified: list[VerifiedTree] = []
    first = 0
    for chunk in chunks:
        assert chunk.tree is not None
        num_rows = len(chunk.tree) + 1
        acceptance = accept_path(chunk.tree, drawn.token_ids[first : first + num_rows])
        rows = [first + r for r in acceptance.rows]
        top = drawn.top_logprobs
        verified.append(VerifiedTree(
            chunk.request_id,
            acceptance,
            [drawn.logprobs[r] for r in rows],
            [top[r] for r in rows] if top is not None else [[] for _ in rows],
        ))
        first += num_rows
    return verified


def accepted_kv_moves(
    chunks: Sequence[SequenceChunk], verified: Sequence[VerifiedTree], block_size: int
) -> tuple[list[int], list[int]]:
    """``(src_slots, dst_slots)``: accepted nodes' K/V into the slots of their depth."""
    src: list[int] = []
    dst: list[int] = []
    for chunk, result in zip(chunks, verified, strict=True):
        table = chunk.block_table
        for depth, node in enumerate(result.acceptance.nodes, start=1):
            if node + 1 == depth:
                continue  # already in place (a chain prefix)
            for pos, out in ((chunk.start_pos + 1 + node, src), (chunk.start_pos + depth, dst)):
                out.append(table[pos // block_size] * block_size + pos % block_size)
    return src, dst


def move_kv(
    caches: Sequence[tuple[torch.Tensor, torch.Tensor]],  # per layer (k, v)
    src_slots: list[int],
    dst_slots: list[int],
) -> None:
    """Copy slot contents src -> dst in every layer (all reads before any write)."""
    if not src_slots:
        return
    device = caches[0][0].device
    src = torch.tensor(src_slots, dtype=torch.int64, device=device)
    dst = torch.tensor(dst_slots, dtype=torch.int64, device=device)
    for k_cache, v_cache in caches:
        for cache in (k_cache, v_cache):
            flat = cache.view(-1, *cache.shape[2:])  # [slots, kv_heads, head_dim]
            flat.index_copy_(0, dst, flat.index_select(0, src))

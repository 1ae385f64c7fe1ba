"""Verification of draft trees against the target model's logits (torch side).

For each tree chunk the runner computed logits at every row (root + nodes).
Each row is judged as the request would be sampled at that point: its
penalties and min_tokens see the request's output *plus the row's path*
(the accepted drafts above it), and a seeded request draws from its own
generator. Then :mod:`streamgen.spec.acceptance` walks the tree, and the
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
from streamgen.spec.acceptance import Acceptance, accept_greedy, accept_sampled


@dataclass(frozen=True, slots=True)
class VerifiedTree:
    """One tree's outcome: what it emits and the logprob of each emitted token."""

    request_id: str
    acceptance: Acceptance
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None


def row_requests(chunk: SequenceChunk) -> list[SamplingRequest]:
    """The sampling view of every row of a tree chunk (root first)."""
    assert chunk.tree is not None and chunk.sampling is not None
    base = chunk.sampling
    tree = chunk.tree
    rows = [base]
    for node in range(len(tree)):
        path = [tree.tokens[n] for n in tree.path_to(node)]
        rows.append(
            SamplingRequest(base.params, base.prompt_token_ids, (*base.output_token_ids, *path))
        )
    return rows


def verify_trees(
    logits: torch.Tensor,  # [sum of rows, vocab], the tree chunks' rows in order
    chunks: Sequence[SequenceChunk],
    sampler: Sampler,
) -> list[VerifiedTree]:
    """Accept the longest valid path plus one token of every tree chunk."""
    requests = [r for chunk in chunks for r in row_requests(chunk)]
    probs, logprobs = sampler.distributions(logits, requests)  # [rows, vocab] each
    probs_host = probs.cpu()
    verified: list[VerifiedTree] = []
    first = 0
    for chunk in chunks:
        assert chunk.tree is not None and chunk.sampling is not None
        num_rows = len(chunk.tree) + 1
        rows = probs_host[first : first + num_rows]  # [num_rows, vocab]
        if chunk.sampling.params.is_greedy:
            acceptance = accept_greedy(chunk.tree, rows.argmax(dim=-1).tolist())
        else:
            generator = sampler.step_generator(chunk.sampling, torch.device("cpu"))
            acceptance = accept_sampled(chunk.tree, rows, generator)
        token_rows = torch.tensor([first + r for r in acceptance.rows])
        tokens = torch.tensor(acceptance.token_ids)
        chosen = logprobs[token_rows.to(logprobs.device), tokens.to(logprobs.device)]
        top = None
        k = chunk.sampling.params.logprobs
        if k is not None:
            values, ids = logprobs[token_rows.to(logprobs.device)].topk(max(k, 1), dim=-1)
            top = [
                list(zip(i[:k], v[:k], strict=True))
                for i, v in zip(ids.tolist(), values.tolist(), strict=True)
            ]
        verified.append(VerifiedTree(chunk.request_id, acceptance, chosen.tolist(), top))
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

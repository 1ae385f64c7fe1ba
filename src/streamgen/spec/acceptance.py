"""Which draft tokens a verification step keeps: the longest valid path plus one.

Row ``r`` of the verification chunk is the target model's next-token
distribution after the root (``r = 0``) or after node ``r - 1``. Walking down
from the root, each step either moves into a child (its token is accepted)
or stops with one token drawn from the row itself (the correction, or the
bonus token below an accepted leaf). Every step therefore emits between 1 and
``max_depth + 1`` tokens.

Greedy: move into the child whose token is the row's argmax.

Sampling (lossless): the children of a node are distinct candidate tokens
``c1, c2, ...`` fixed before the target is consulted (a drafter's top-k or
n-gram continuations, chosen without replacement). With ``p`` the row's
target distribution, candidate ``ci`` is accepted with probability
``p_i(ci)`` where ``p_i`` is ``p`` with ``c1 .. c(i-1)`` removed and
renormalised; if all are rejected the token is drawn from ``p`` with every
candidate removed. Then ``P(c1) = p(c1)``,
``P(c2) = (1 - p(c1)) * p(c2) / (1 - p(c1)) = p(c2)``, and any other token
``x`` gets ``(1 - sum p(ci)) * p(x) / (1 - sum p(ci)) = p(x)``: the emitted
token follows the target distribution exactly, whatever the drafts were.
(This is multi-draft rejection sampling with a point-mass draft
distribution; drafters here choose their candidates deterministically.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from streamgen.spec.tree import ROOT, DraftTree


@dataclass(frozen=True, slots=True)
class Acceptance:
    """The outcome of verifying one tree.

    Attributes:
        nodes: Accepted nodes, from depth 1 down.
        token_ids: Emitted tokens: the accepted nodes' tokens, then one more.
        rows: For each emitted token, the verification row it was drawn from.
    """

    nodes: tuple[int, ...]
    token_ids: tuple[int, ...]
    rows: tuple[int, ...]

    @property
    def num_accepted(self) -> int:
        return len(self.nodes)


def accept_greedy(tree: DraftTree, argmax: Sequence[int]) -> Acceptance:
    """Follow the argmax of each row down the tree (``argmax[r]`` for row ``r``).

    Example::

        root ── 5 ── 6        row argmaxes: root 5, node0 7, node1 ...
                └─── 7        -> accept 5, then 7 (node 2), then bonus

        >>> tree = DraftTree.from_paths([[5, 6], [5, 7]])
        >>> accept_greedy(tree, [5, 7, 0, 9])
        Acceptance(nodes=(0, 2), token_ids=(5, 7, 9), rows=(0, 1, 3))
    """
    if len(argmax) != len(tree) + 1:
        raise ValueError(f"need {len(tree) + 1} rows of argmax, got {len(argmax)}")
    nodes: list[int] = []
    tokens: list[int] = []
    rows: list[int] = []
    node = ROOT
    while True:
        row = node + 1
        best = argmax[row]
        tokens.append(best)
        rows.append(row)
        child = next((c for c in tree.children(node) if tree.tokens[c] == best), None)
        if child is None:
            return Acceptance(tuple(nodes), tuple(tokens), tuple(rows))
        nodes.append(child)
        node = child


def accept_sampled(
    tree: DraftTree,
    probs: torch.Tensor,  # [len(tree) + 1, vocab] target distributions, rows sum to 1
    generator: torch.Generator | None = None,
) -> Acceptance:
    """Lossless acceptance for sampled requests; see the module docstring.

    ``probs`` lives on the CPU (a handful of small rows per request); the
    uniform draws and the final draw use ``generator``.
    """
    if probs.dim() != 2 or probs.shape[0] != len(tree) + 1:
        raise ValueError(f"probs must be [{len(tree) + 1}, vocab], got {tuple(probs.shape)}")
    nodes: list[int] = []
    tokens: list[int] = []
    rows: list[int] = []
    node = ROOT
    while True:
        row = node + 1
        residual = probs[row].to(torch.float64).clone()  # [vocab]
        accepted = None
        for child in tree.children(node):
            token = tree.tokens[child]
            mass = float(residual.sum())
            p_token = float(residual[token])
            if mass > 0 and torch.rand((), generator=generator).item() * mass < p_token:
                accepted = child
                break
            residual[token] = 0.0
        rows.append(row)
        if accepted is None:
            if float(residual.sum()) <= 0:  # numerically exhausted: fall back to the row
                residual = probs[row].to(torch.float64)
            token = int(torch.multinomial(residual, 1, generator=generator))
            tokens.append(token)
            return Acceptance(tuple(nodes), tuple(tokens), tuple(rows))
        tokens.append(tree.tokens[accepted])
        nodes.append(accepted)
        node = accepted

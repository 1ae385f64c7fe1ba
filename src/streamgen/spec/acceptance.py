"""Which draft tokens a verification step keeps: the longest valid path plus one.

Row ``r`` of the verification chunk is the target model's next-token
distribution after the root (``r = 0``) or after node ``r - 1``. The
sampler first draws *the* token the request would get at each row
(greedy: the argmax; sampling: the exponential race ``argmax(p / E)``,
whose noise ``E`` for a seeded request depends only on the seed and the
output position). Walking down from the root, a child is accepted iff its
token is its parent row's drawn token; the walk stops at the first row whose
drawn token is not among the children and emits that token (the correction,
or the bonus token below an accepted leaf). A step emits between 1 and
``max_depth + 1`` tokens.

This is lossless at any temperature: every emitted token is exactly the
token plain decoding would have drawn after the same prefix, so the output
distribution is the target's. With candidates ``c1 .. ck`` at a node
(distinct tokens, chosen by the drafter without replacement and before the
target is consulted) the walk continues with probability
``p(c1) + .. + p(ck)``, the same as multi-draft rejection sampling with
point-mass drafts, whose acceptance it matches. Because the race's noise is
tied to (seed, position), a seeded request also reproduces exactly whatever
the tree shape, and therefore whatever else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def accept_path(tree: DraftTree, drawn: Sequence[int]) -> Acceptance:
    """Follow each row's drawn token (``drawn[r]`` for row ``r``) down the tree.

    Example::

        root ── 5 ── 6        drawn: root 5, node0 7, ...
                └─── 7        -> accept 5, then 7 (node 2), then node 2's draw

        >>> tree = DraftTree.from_paths([[5, 6], [5, 7]])
        >>> accept_path(tree, [5, 7, 0, 9])
        Acceptance(nodes=(0, 2), token_ids=(5, 7, 9), rows=(0, 1, 3))
    """
    if len(drawn) != len(tree) + 1:
        raise ValueError(f"need {len(tree) + 1} drawn tokens, got {len(drawn)}")
    nodes: list[int] = []
    tokens: list[int] = []
    rows: list[int] = []
    node = ROOT
    while True:
        row = node + 1
        best = drawn[row]
        tokens.append(best)
        rows.append(row)
        child = next((c for c in tree.children(node) if tree.tokens[c] == best), None)
        if child is None:
            return Acceptance(tuple(nodes), tuple(tokens), tuple(rows))
        nodes.append(child)
        node = child

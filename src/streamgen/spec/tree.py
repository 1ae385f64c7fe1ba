"""Draft token trees: the candidates one verification step checks at once.

A tree hangs below the *root*: the request's last token, whose K/V is not
yet computed (the token a plain decode step would feed). Nodes are stored in
topological order (a parent before its children), so any prefix of the node
list is itself a valid tree; that is how a tree is cut to a budget::

    root "the" (row 0)
    ├── 1 "cat"          parents = (-1, 0, 0, -1)    depth 1, 2, 2, 1
    │   ├── 2 "sat"      tokens  = (cat, sat, ran, dog)
    │   └── 3 "ran"
    └── 4 "dog"

(Node ``i`` is row ``i + 1`` of the verification chunk; row 0 is the root.)
A chain is a tree with one branch. In the verification batch node ``i``
sits at position ``prefix_len + depth(i)`` and sees the cached prefix, the
root, its ancestors and itself (:meth:`DraftTree.visibility`).

Torch-free: the scheduler and the drafters build and cut trees on the host.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

ROOT = -1
"""Parent index of a depth-1 node."""


@dataclass(frozen=True, slots=True)
class DraftTree:
    """Draft tokens below the root, in topological order.

    Example:
        >>> tree = DraftTree.from_paths([[5, 6, 7], [5, 8], [9]])
        >>> tree.tokens, tree.parents
        ((5, 6, 7, 8, 9), (-1, 0, 1, 0, -1))
        >>> print(tree.draw())
        root
        ├── 5
        │   ├── 6
        │   │   └── 7
        │   └── 8
        └── 9
    """

    tokens: tuple[int, ...] = ()
    parents: tuple[int, ...] = ()
    _depths: tuple[int, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise ValueError(
                f"tokens ({len(self.tokens)}) and parents ({len(self.parents)}) differ in length"
            )
        depths: list[int] = []
        for i, parent in enumerate(self.parents):
            if not ROOT <= parent < i:
                raise ValueError(f"node {i}: parent {parent} must be -1 or an earlier node")
            depths.append(1 if parent == ROOT else depths[parent] + 1)
        object.__setattr__(self, "_depths", tuple(depths))

    # ----- construction ------------------------------------------------------------

    @classmethod
    def chain(cls, tokens: Iterable[int]) -> DraftTree:
        """A single branch.

        >>> DraftTree.chain([4, 2]).parents
        (-1, 0)
        """
        tokens = tuple(tokens)
        return cls(tokens, tuple(range(-1, len(tokens) - 1)))

    @classmethod
    def from_paths(
        cls, paths: Iterable[Sequence[int]], max_nodes: int | None = None
    ) -> DraftTree:
        """Merge token paths (best first) into a trie, sharing common prefixes.

        Stops adding nodes at ``max_nodes``; nodes keep first-seen order, so
        earlier paths (the more likely ones) survive a cut.
        """
        tokens: list[int] = []
        parents: list[int] = []
        children: dict[tuple[int, int], int] = {}  # (parent, token) -> node
        for path in paths:
            parent = ROOT
            for token in path:
                node = children.get((parent, token))
                if node is None:
                    if max_nodes is not None and len(tokens) >= max_nodes:
                        break
                    node = len(tokens)
                    tokens.append(token)
                    parents.append(parent)
                    children[(parent, token)] = node
                parent = node
        return cls(tuple(tokens), tuple(parents))

    # ----- queries -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depths(self) -> tuple[int, ...]:
        """Depth of each node (1 for a child of the root)."""
        return self._depths

    @property
    def max_depth(self) -> int:
        return max(self._depths, default=0)

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def children(self, node: int) -> list[int]:
        """Children of ``node`` (``ROOT`` for the root), in node order."""
        return [i for i, p in enumerate(self.parents) if p == node]

    def path_to(self, node: int) -> list[int]:
        """Nodes from depth 1 down to ``node`` (``[]`` for the root)."""
        path: list[int] = []
        while node != ROOT:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def truncate(self, max_nodes: int) -> DraftTree:
        """The first ``max_nodes`` nodes (still a valid tree: parents come first)."""
        if max_nodes >= len(self.tokens):
            return self
        return DraftTree(self.tokens[:max_nodes], self.parents[:max_nodes])

    def limit_depth(self, max_depth: int) -> DraftTree:
        """Drop every node deeper than ``max_depth`` (renumbering the rest)."""
        if self.max_depth <= max_depth:
            return self
        return self.subtree([i for i, d in enumerate(self._depths) if d <= max_depth])

    def subtree(self, keep: Sequence[int]) -> DraftTree:
        """The nodes ``keep`` (ascending, each with its parent kept), renumbered.

        >>> DraftTree.from_paths([[5, 6], [9]]).subtree([0, 2]).tokens
        (5, 9)
        """
        if len(keep) == len(self.tokens):
            return self
        new_index = {old: new for new, old in enumerate(keep)}
        return DraftTree(
            tuple(self.tokens[i] for i in keep),
            tuple(ROOT if self.parents[i] == ROOT else new_index[self.parents[i]] for i in keep),
        )

    def position_offsets(self) -> list[int]:
        """Position of each verification row relative to the root: ``[0, depth...]``."""
        return [0, *self._depths]

    def visibility(self) -> list[list[bool]]:
        """``[rows][rows]`` with rows = root + nodes: row r sees row c (root, ancestors, self).

        >>> DraftTree.from_paths([[1, 2], [3]]).visibility()
        [[True, False, False, False], [True, True, False, False], [True, True, True, False], [True, False, False, True]]
        """  # noqa: E501
        rows = len(self.tokens) + 1
        seen = [[False] * rows for _ in range(rows)]
        seen[0][0] = True
        for i, parent in enumerate(self.parents):
            row = seen[i + 1]
            row[:] = seen[parent + 1]
            row[i + 1] = True
        return seen

    def draw(self, label: Sequence[str] | None = None) -> str:
        """An ASCII drawing (tokens, or ``label[i]`` per node), for tests and debugging."""
        lines = ["root"]

        def walk(node: int, prefix: str) -> None:
            kids = self.children(node)
            for k, child in enumerate(kids):
                last = k == len(kids) - 1
                text = str(self.tokens[child]) if label is None else label[child]
                lines.append(f"{prefix}{'└── ' if last else '├── '}{text}")
                walk(child, prefix + ("    " if last else "│   "))

        walk(ROOT, "")
        return "\n".join(lines)

"""N-gram (prompt lookup) drafting: continue the text the way it went before.

For input-grounded work (rewrite, correct, extract) the output copies long
runs of the input. The drafter looks up the request's last ``n`` tokens
(longest ``n`` first) among its own prompt and output and proposes what
followed each earlier occurrence, most recent first; several matches become
several branches of one tree (merged where they agree)::

    context ... the cat sat on the mat . the cat ran ... the cat
                        ^^^^^^^^^^                ^^^^^^^
    tree:  root ── sat ── on ── the ── mat        (older match)
               └── ran ── ...                     (newer match, listed first)

An index of n-gram -> end positions is kept per request and extended as
tokens arrive, so a proposal costs O(matches), not O(context). Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from streamgen.errors import ConfigError
from streamgen.spec.drafter import DraftInput
from streamgen.spec.tree import DraftTree


@dataclass(slots=True)
class _NgramIndex:
    tokens: list[int] = field(default_factory=list)
    # n -> n-gram -> end indices (exclusive) of its occurrences, oldest first.
    ends: dict[int, dict[tuple[int, ...], list[int]]] = field(default_factory=dict)

    def extend(self, inputs: DraftInput, sizes: range) -> None:
        for index in range(len(self.tokens), inputs.num_tokens):
            self.tokens.append(inputs.token_at(index))
            end = index + 1
            for n in sizes:
                if end >= n:
                    key = tuple(self.tokens[end - n : end])
                    self.ends.setdefault(n, {}).setdefault(key, []).append(end)


class NgramDrafter:
    """Prompt-lookup drafter.

    Args:
        min_ngram: Shortest suffix to look up.
        max_ngram: Longest suffix to look up (tried first).
        max_branches: Most continuations merged into one tree.

    Example:
        >>> from streamgen.spec.drafter import DraftInput
        >>> drafter = NgramDrafter(min_ngram=1, max_ngram=2)
        >>> tokens = [1, 2, 3, 4, 9, 1, 2]
        >>> inp = DraftInput("a", tokens, [], len(tokens) - 1, [0], max_nodes=8, max_depth=3)
        >>> drafter.propose([inp])[0].tokens
        (3, 4, 9)
    """

    name = "ngram"

    def __init__(self, min_ngram: int = 2, max_ngram: int = 4, max_branches: int = 3) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ConfigError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        if max_branches < 1:
            raise ConfigError(f"max_branches must be >= 1, got {max_branches}")
        self.sizes = range(min_ngram, max_ngram + 1)
        self.max_branches = max_branches
        self._indexes: dict[str, _NgramIndex] = {}

    def propose(self, inputs: Sequence[DraftInput]) -> list[DraftTree]:
        return [self._propose_one(inp) for inp in inputs]

    def reset(self, request_id: str) -> None:
        """The index depends on tokens only: nothing to rebuild after preemption."""

    def forget(self, request_id: str) -> None:
        self._indexes.pop(request_id, None)

    def _propose_one(self, inp: DraftInput) -> DraftTree:
        if inp.max_nodes <= 0 or inp.max_depth <= 0:
            return DraftTree()
        index = self._indexes.setdefault(inp.request_id, _NgramIndex())
        index.extend(inp, self.sizes)
        tokens = index.tokens
        end = len(tokens)
        paths: list[list[int]] = []
        seen_starts: set[int] = set()
        for n in reversed(self.sizes):
            if end < n:
                continue
            occurrences = index.ends.get(n, {}).get(tuple(tokens[end - n :]), [])
            for start in reversed(occurrences):  # most recent first
                if start >= end or start in seen_starts:
                    continue
                seen_starts.add(start)
                path = tokens[start : start + inp.max_depth]
                if path:
                    paths.append(path)
                if len(paths) >= self.max_branches:
                    break
            if len(paths) >= self.max_branches:
                break
        return DraftTree.from_paths(paths, max_nodes=inp.max_nodes)

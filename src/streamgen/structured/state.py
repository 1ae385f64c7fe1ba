"""One constrained request's grammar state on the core thread: an llguidance matcher
that has consumed exactly the request's output tokens (the scheduler advances it with
every token it emits, accepted draft tokens included), so a preemption, by recompute
or swap, keeps it as it is.

Masks are int32 bitmasks (``[ceil(vocab / 32)]``, token t = bit t % 32 of word t // 32),
llguidance's own layout. A draft tree is first cut to the branches the grammar allows,
then each kept node gets the mask of the state after its path (consumed, then rolled
back), so every verified row samples under its own tree position's constraint.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from streamgen.spec.tree import DraftTree

logger = logging.getLogger(__name__)


class GrammarState:
    """A request's matcher.

    >>> state = GrammarState(compiler.matcher(StructuredOutputs(choice=["yes"])))  # doctest: +SKIP
    >>> state.mask()  # the allowed first tokens  # doctest: +SKIP
    """

    def __init__(self, matcher: Any, num_words: int, executor: Any = None) -> None:
        self.matcher = matcher
        self.num_words = num_words  # the mask's int32 words: ceil(tokenizer vocab / 32)
        self.executor = executor  # llguidance's LLExecutor, for masks of several states

    @property
    def is_done(self) -> bool:
        """Complete (nothing but EOS may follow), or broken by a rejected token."""
        return bool(self.matcher.is_stopped())

    def advance(self, token: int) -> None:
        """Consume an emitted token (a rejected one leaves the matcher stopped: the
        request then ends; masks make this unreachable)."""
        if not self.matcher.consume_token(token):
            logger.warning("structured output: token %d rejected: %s", token,
                           self.matcher.get_error())  # fmt: skip

    def mask(self) -> np.ndarray:
        """The tokens allowed next: ``[num_words]`` int32."""
        return np.frombuffer(self.matcher.compute_bitmask(), dtype=np.int32)[: self.num_words]

    def cut_tree(self, tree: DraftTree) -> DraftTree:
        """The tree's nodes whose whole path the grammar accepts (a cut branch loses
        every node below it)."""
        keep = []
        kept = set()
        for node in range(len(tree)):
            parent = tree.parents[node]
            if parent != -1 and parent not in kept:
                continue
            path = [tree.tokens[n] for n in tree.path_to(node)]
            if self.matcher.validate_tokens(path) == len(path):
                keep.append(node)
                kept.add(node)
        return tree.subtree(keep)

    def tree_masks(self, tree: DraftTree) -> list[np.ndarray]:
        """Each node's mask: the state after its path (the tree already cut)."""
        masks = []
        for node in range(len(tree)):
            path = [tree.tokens[n] for n in tree.path_to(node)]
            consumed = self.matcher.consume_tokens(path)
            assert consumed, "cut_tree keeps only paths the grammar accepts"
            masks.append(self.mask())
            self.matcher.rollback(len(path))
        return masks


def masks_for(states: Sequence[GrammarState]) -> np.ndarray:
    """The next-token masks of several states (one tokenizer) at once:
    ``[len(states), num_words]`` int32, in parallel on llguidance's executor (which
    releases the GIL) when there is more than one."""
    num_words = states[0].num_words
    executor = states[0].executor
    if len(states) == 1 or executor is None:
        return np.stack([state.mask() for state in states])
    out = np.empty((len(states), num_words), dtype=np.int32)
    executor.unsafe_compute_mask_ptr(
        [(s.matcher, i) for i, s in enumerate(states)], out.ctypes.data, num_words * 4,
        len(states),
    )  # fmt: skip
    return out

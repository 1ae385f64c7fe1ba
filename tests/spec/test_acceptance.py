"""The acceptance walk on drawn trees (the distribution test with a real model is
in test_tree_verification.py)."""

from __future__ import annotations

import pytest

from streamgen.spec.acceptance import Acceptance, accept_path
from streamgen.spec.tree import DraftTree


def test_walk_accepts_the_drawn_path_and_adds_the_next_token() -> None:
    #   root ── 5 ── 6 ── 7
    #       │    └── 8
    #       └── 9
    tree = DraftTree.from_paths([[5, 6, 7], [5, 8], [9]])
    # rows: root, node0 (5), node1 (6), node2 (7), node3 (8), node4 (9)
    assert accept_path(tree, [5, 8, 0, 0, 4, 0]) == Acceptance((0, 3), (5, 8, 4), (0, 1, 4))
    assert accept_path(tree, [5, 6, 7, 1, 0, 0]) == Acceptance((0, 1, 2), (5, 6, 7, 1),
                                                                  (0, 1, 2, 3))
    assert accept_path(tree, [9, 0, 0, 0, 0, 3]) == Acceptance((4,), (9, 3), (0, 5))
    assert accept_path(tree, [2, 0, 0, 0, 0, 0]) == Acceptance((), (2,), (0,))


def test_an_empty_tree_is_a_plain_step() -> None:
    assert accept_path(DraftTree(), [7]) == Acceptance((), (7,), (0,))
    with pytest.raises(ValueError):
        accept_path(DraftTree.chain([1]), [7])

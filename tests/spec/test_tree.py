"""Draft trees: construction, cuts, positions and visibility, checked on drawn trees."""

from __future__ import annotations

import pytest

from streamgen.spec.tree import ROOT, DraftTree


def test_paths_merge_into_a_trie_with_shared_prefixes() -> None:
    tree = DraftTree.from_paths([[5, 6, 7], [5, 8], [9, 1], [5, 6, 2]])
    assert tree.draw() == "\n".join([
        "root",
        "├── 5",
        "│   ├── 6",
        "│   │   ├── 7",
        "│   │   └── 2",
        "│   └── 8",
        "└── 9",
        "    └── 1",
    ])
    assert tree.depths == (1, 2, 3, 2, 1, 2, 3)
    assert tree.max_depth == 3
    assert not tree.is_chain


def test_node_budget_keeps_the_earlier_paths() -> None:
    tree = DraftTree.from_paths([[5, 6, 7], [5, 8], [9]], max_nodes=4)
    assert tree.draw() == "root\n└── 5\n    ├── 6\n    │   └── 7\n    └── 8"


def test_chain_is_a_tree_with_one_branch() -> None:
    chain = DraftTree.chain([3, 4, 5])
    assert chain.parents == (ROOT, 0, 1)
    assert chain.is_chain
    assert chain.position_offsets() == [0, 1, 2, 3]
    assert chain.draw() == "root\n└── 3\n    └── 4\n        └── 5"


def test_visibility_is_root_ancestors_and_self() -> None:
    #   root ── a ── b
    #       │    └── c
    #       └── d
    tree = DraftTree.from_paths([[10, 11], [10, 12], [13]])
    seen = tree.visibility()
    as_text = ["".join("x" if v else "." for v in row) for row in seen]
    assert as_text == [
        "x....",  # root
        "xx...",  # a
        "xxx..",  # b: root, a, b
        "xx.x.",  # c: root, a, c (not its sibling b)
        "x...x",  # d
    ]
    assert tree.position_offsets() == [0, 1, 2, 2, 1]


def test_truncate_and_limit_depth_give_valid_trees() -> None:
    tree = DraftTree.from_paths([[1, 2, 3], [1, 4], [5, 6]])
    assert tree.truncate(2) == DraftTree((1, 2), (ROOT, 0))
    shallow = tree.limit_depth(1)
    assert shallow.tokens == (1, 5) and shallow.parents == (ROOT, ROOT)
    two = tree.limit_depth(2)
    assert two.draw() == "root\n├── 1\n│   ├── 2\n│   └── 4\n└── 5\n    └── 6"
    assert tree.path_to(2) == [0, 1, 2]
    assert tree.children(ROOT) == [0, 4]


@pytest.mark.parametrize(
    ("tokens", "parents"), [((1, 2), (ROOT,)), ((1,), (0,)), ((1, 2), (ROOT, 1))]
)
def test_malformed_trees_are_rejected(tokens: tuple, parents: tuple) -> None:
    with pytest.raises(ValueError):
        DraftTree(tokens, parents)

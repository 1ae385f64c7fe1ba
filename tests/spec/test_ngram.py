"""Prompt-lookup drafting on hand-made contexts."""

from __future__ import annotations

import pytest

from streamgen.errors import ConfigError
from streamgen.spec.drafter import DraftInput
from streamgen.spec.ngram import NgramDrafter


def draft_input(tokens: list[int], max_nodes: int = 8, max_depth: int = 4, rid: str = "a"):
    prompt, output = tokens[:5], tokens[5:]
    return DraftInput(rid, prompt, output, len(tokens) - 1, [0, 1], max_nodes, max_depth)


def test_longest_suffix_match_continues_the_earlier_text() -> None:
    #   1 2 3 4 5 6 | 9 9 | 1 2 3   -> after "1 2 3" came "4 5 6 9"
    tokens = [1, 2, 3, 4, 5, 6, 9, 9, 1, 2, 3]
    tree = NgramDrafter(min_ngram=2, max_ngram=3).propose([draft_input(tokens)])[0]
    assert tree.tokens == (4, 5, 6, 9) and tree.is_chain


def test_several_matches_become_branches_most_recent_first() -> None:
    # "7 8" was followed by 1 2 earlier and by 3 4 later.
    tokens = [7, 8, 1, 2, 0, 7, 8, 3, 4, 0, 7, 8]
    tree = NgramDrafter(min_ngram=2, max_ngram=2, max_branches=2).propose(
        [draft_input(tokens, max_depth=2)]
    )[0]
    assert tree.draw() == "root\n├── 3\n│   └── 4\n└── 1\n    └── 2"


def test_budgets_and_no_match() -> None:
    drafter = NgramDrafter(min_ngram=1, max_ngram=2)
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert len(drafter.propose([draft_input(tokens, max_nodes=2)])[0]) == 2
    assert drafter.propose([draft_input([1, 2, 3, 4, 5, 6, 7], rid="b")])[0].tokens == ()
    assert drafter.propose([draft_input(tokens, max_nodes=0, rid="c")])[0].tokens == ()


def test_the_index_grows_with_the_output() -> None:
    drafter = NgramDrafter(min_ngram=2, max_ngram=2)
    tokens = [1, 2, 3, 4, 5, 6, 7]
    assert drafter.propose([draft_input(tokens)])[0].tokens == ()
    tokens += [1, 2]  # the request generated "1 2": now "1 2" has an earlier occurrence
    assert drafter.propose([draft_input(tokens)])[0].tokens[:2] == (3, 4)
    drafter.forget("a")
    assert "a" not in drafter._indexes


def test_bad_sizes_are_config_errors() -> None:
    with pytest.raises(ConfigError):
        NgramDrafter(min_ngram=3, max_ngram=2)
    with pytest.raises(ConfigError):
        NgramDrafter(max_branches=0)

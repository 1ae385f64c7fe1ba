"""Acceptance rules: greedy walks on drawn trees, and the lossless sampled rule
against the target distribution (with a wrong rule that the same test catches)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from chi_square import chi_square_p_value

from streamgen.spec.acceptance import Acceptance, accept_greedy, accept_sampled
from streamgen.spec.tree import ROOT, DraftTree


def test_greedy_accepts_the_argmax_path_and_adds_the_next_token() -> None:
    #   root ── 5 ── 6 ── 7
    #       │    └── 8
    #       └── 9
    tree = DraftTree.from_paths([[5, 6, 7], [5, 8], [9]])
    # rows: root, node0 (5), node1 (6), node2 (7), node3 (8), node4 (9)
    assert accept_greedy(tree, [5, 8, 0, 0, 4, 0]) == Acceptance((0, 3), (5, 8, 4), (0, 1, 4))
    assert accept_greedy(tree, [5, 6, 7, 1, 0, 0]) == Acceptance((0, 1, 2), (5, 6, 7, 1),
                                                                  (0, 1, 2, 3))
    assert accept_greedy(tree, [9, 0, 0, 0, 0, 3]) == Acceptance((4,), (9, 3), (0, 5))
    assert accept_greedy(tree, [2, 0, 0, 0, 0, 0]) == Acceptance((), (2,), (0,))


def test_greedy_on_an_empty_tree_is_a_plain_step() -> None:
    assert accept_greedy(DraftTree(), [7]) == Acceptance((), (7,), (0,))
    with pytest.raises(ValueError):
        accept_greedy(DraftTree.chain([1]), [7])


def test_sampled_acceptance_is_certain_when_the_target_agrees() -> None:
    tree = DraftTree.chain([1, 2])
    probs = torch.zeros(3, 4)
    probs[0, 1] = probs[1, 2] = probs[2, 3] = 1.0
    assert accept_sampled(tree, probs).token_ids == (1, 2, 3)
    probs[1] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # the target never says 2 after 1
    assert accept_sampled(tree, probs) == Acceptance((0,), (1, 3), (0, 1))


def _wrong_rule(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator) -> Acceptance:
    """Tests each child against the *unrenormalized* target and keeps rejected
    candidates in the final draw: over-produces the drafted tokens."""
    node, nodes, tokens, rows = ROOT, [], [], []
    while True:
        row = probs[node + 1]
        rows.append(node + 1)
        for child in tree.children(node):
            if torch.rand((), generator=generator).item() < float(row[tree.tokens[child]]):
                nodes.append(child)
                tokens.append(tree.tokens[child])
                node = child
                break
        else:
            tokens.append(int(torch.multinomial(row, 1, generator=generator)))
            return Acceptance(tuple(nodes), tuple(tokens), tuple(rows))


def _first_two(rule, tree: DraftTree, probs: torch.Tensor, draws: int) -> Counter:
    generator = torch.Generator().manual_seed(1234)
    return Counter(rule(tree, probs, generator).token_ids[:2] for _ in range(draws))


@pytest.mark.parametrize("rule", [accept_sampled, _wrong_rule], ids=["lossless", "wrong"])
def test_sampled_tokens_follow_the_target_distribution(rule) -> None:
    torch.manual_seed(0)
    vocab = 6
    # Two candidates at the root (the target's two most likely tokens) and a
    # chain below the first: the joint law of the first two tokens is known.
    probs = torch.softmax(torch.randn(4, vocab) * 1.5, dim=-1)  # rows: root, 3 nodes
    top = probs[0].argsort(descending=True).tolist()
    second = probs[1].argsort(descending=True).tolist()
    tree = DraftTree.from_paths([[top[0], second[0]], [top[1]]])
    draws = 12_000
    counts = _first_two(rule, tree, probs, draws)
    # Only the first token is drawn from a fixed row in every case; the second
    # is from node rows when the first was accepted. Check the first token's
    # law, and the second's given an accepted first token.
    first = Counter()
    for (t1, *_), n in counts.items():
        first[t1] += n
    p_first = chi_square_p_value(first, dict(enumerate(probs[0].tolist())))
    after_top0 = Counter({t2: n for (t1, *rest), n in counts.items() if t1 == top[0]
                          for t2 in rest})
    p_second = chi_square_p_value(after_top0, dict(enumerate(probs[1].tolist())))
    if rule is accept_sampled:
        assert p_first > 1e-3 and p_second > 1e-3, (p_first, p_second)
    else:
        assert min(p_first, p_second) < 1e-6, (p_first, p_second)

"""Token masks: the allowed set equals llguidance's own token-by-token verdict for random
prefixes; a masked row never yields a disallowed token, whatever top-k / top-p cut first;
the draw is the model's distribution renormalised over the allowed tokens (chi-square);
a draft tree is cut to the branches the grammar accepts and each node gets the mask of
its own path."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

from streamgen import SamplingParams, StructuredOutputs
from streamgen.runner.batch import SamplingRequest
from streamgen.runner.sampler import Sampler, apply_allowed
from streamgen.spec.tree import DraftTree
from streamgen.structured.state import masks_for

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": 0, "maximum": 99},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "n"],
}


def allowed_ids(mask: np.ndarray, vocab: int) -> set[int]:
    bits = np.unpackbits(mask.view(np.uint8), bitorder="little")[:vocab]
    return set(np.nonzero(bits)[0].tolist())


def walk(state: Any, rng: random.Random, steps: int) -> list[int]:
    """Advance along random allowed tokens; the tokens taken."""
    vocab = len(state.mask()) * 32
    taken: list[int] = []
    for _ in range(steps):
        if state.is_done:
            break
        taken.append(rng.choice(sorted(allowed_ids(state.mask(), vocab))))
        state.advance(taken[-1])
    return taken


@pytest.mark.parametrize(
    "constraint",
    [StructuredOutputs(json=SCHEMA), StructuredOutputs(regex="[0-9]{2}-[a-z]+"),
     StructuredOutputs(choice=["alpha", "beta", "alphabet"])],
)
def test_the_mask_is_llguidances_own_and_only_allows_valid_tokens(
    compiler: Any, tokenizer: Any, constraint: StructuredOutputs
) -> None:
    """For random prefixes: the state's mask equals what a matcher built from scratch on
    the same prefix computes through llguidance's other mask path (one byte per token),
    and every allowed token is one the matcher accepts."""
    from llguidance import LLMatcher

    rng = random.Random(0)
    vocab = len(tokenizer)
    for steps in (0, 1, 3, 6):
        state = compiler.state(constraint)
        prefix = walk(state, rng, steps)
        if state.is_done:
            continue
        fresh = LLMatcher(compiler._tokenizer(), compiler.check(constraint))
        assert fresh.consume_tokens(prefix)
        bias = np.frombuffer(fresh.compute_logit_bias(), dtype=np.uint8)[:vocab]
        allowed = allowed_ids(state.mask(), vocab)
        assert allowed == set(np.nonzero(bias)[0].tolist()), steps
        assert allowed, "a live constraint always allows something"
        assert all(state.matcher.validate_tokens([t]) == 1 for t in allowed)


def test_masks_in_parallel_equal_one_at_a_time(compiler: Any) -> None:
    rng = random.Random(1)
    states = [compiler.state(StructuredOutputs(json=SCHEMA)) for _ in range(5)]
    for i, state in enumerate(states):
        walk(state, rng, i * 2)
    together = masks_for(states)
    assert all((together[i] == s.mask()).all() for i, s in enumerate(states))


def requests_with(mask: np.ndarray, **params: Any) -> list[SamplingRequest]:
    return [SamplingRequest(SamplingParams(**params), [0], [], mask)]


def test_a_masked_row_never_yields_a_disallowed_token_even_after_top_k_top_p() -> None:
    vocab = 64
    allowed = [3, 40, 41]
    mask = np.zeros(2, dtype=np.int32)
    for t in allowed:
        mask.view(np.uint32)[t // 32] |= np.uint32(1 << (t % 32))
    logits = torch.randn(1, vocab)
    logits[0, [0, 1, 2]] = 20.0  # the most likely tokens are all disallowed
    sampler = Sampler(seed=0)
    for params in ({"temperature": 1.0, "top_k": 2}, {"temperature": 1.0, "top_p": 0.1},
                   {"temperature": 0.0}, {"temperature": 2.0, "min_p": 0.5}):  # fmt: skip
        for _ in range(50):
            token = sampler.sample(logits, requests_with(mask, **params)).token_ids[0]
            assert token in allowed, params
    masked = apply_allowed(logits, requests_with(mask))
    assert torch.isinf(masked[0, [t for t in range(vocab) if t not in allowed]]).all()
    assert torch.equal(masked[0, allowed], logits[0, allowed])  # allowed logits untouched


def test_the_draw_is_the_distribution_renormalised_over_the_allowed_tokens() -> None:
    vocab, draws = 40, 20000
    allowed = [1, 5, 6, 30, 39]
    mask = np.zeros(2, dtype=np.int32)
    for t in allowed:
        mask.view(np.uint32)[t // 32] |= np.uint32(1 << (t % 32))
    torch.manual_seed(0)
    logits = torch.randn(1, vocab) * 1.5
    expected = torch.softmax(logits[0, allowed], dim=0).numpy() * draws
    sampler = Sampler(seed=7)
    batch = logits.expand(500, vocab)
    counts = dict.fromkeys(allowed, 0)
    for _ in range(draws // 500):
        for token in sampler.sample(batch, requests_with(mask) * 500).token_ids:
            counts[token] += 1  # a KeyError would be a disallowed token
    observed = np.array([counts[t] for t in allowed])
    chi2 = float(((observed - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001


def test_a_draft_tree_is_cut_to_the_grammar_and_each_node_masked_by_its_path(
    compiler: Any, tokenizer: Any
) -> None:
    state = compiler.state(StructuredOutputs(choice=["yes please", "no thanks"]))
    ids = {w: tokenizer.convert_tokens_to_ids(w) for w in ("yes", "no", "Ġplease", "Ġthanks")}
    tree = DraftTree.from_paths([
        [ids["yes"], ids["Ġplease"]],  # valid all the way
        [ids["yes"], ids["Ġthanks"]],  # leaves the grammar at depth 2
        [ids["Ġthanks"], ids["no"]],  # leaves it at once (and its child with it)
        [ids["no"], ids["Ġthanks"]],
    ])  # fmt: skip
    cut = state.cut_tree(tree)
    assert [cut.tokens[n] for n in cut.path_to(1)] == [ids["yes"], ids["Ġplease"]]
    paths = {tuple(cut.tokens[n] for n in cut.path_to(node)) for node in range(len(cut))}
    assert paths == {(ids["yes"],), (ids["yes"], ids["Ġplease"]), (ids["no"],),
                     (ids["no"], ids["Ġthanks"])}  # fmt: skip
    masks = state.tree_masks(cut)
    for node in range(len(cut)):
        fresh = compiler.state(StructuredOutputs(choice=["yes please", "no thanks"]))
        for n in cut.path_to(node):
            fresh.advance(cut.tokens[n])
        assert (masks[node] == fresh.mask()).all(), node
    assert (state.mask() == compiler.state(StructuredOutputs(choice=["yes please", "no thanks"])).mask()).all()  # noqa: E501  (rolled back)

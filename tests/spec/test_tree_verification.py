"""Tree verification in the model runner, on a tiny random model (float32).

The tree's logits must equal the logits of plain sequential decoding along
each path (tree mask + positions through the paged cache), greedy
verification must emit what plain decoding emits and leave the KV cache as
plain decoding would, and sampled verification must follow the target's
distribution (chi-square over 10,000 draws, against plain-decoding probs).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from chi_square import chi_square_p_value
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import SamplingParams, load_model
from streamgen.runner.batch import ModelBatch, SamplingRequest, SequenceChunk
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner
from streamgen.spec.acceptance import accept_path
from streamgen.spec.tree import DraftTree
from streamgen.spec.verify import row_requests, verify_trees

PROMPT = [3, 9, 4, 12, 7, 5, 11, 6, 8, 10, 13, 3, 9, 4, 12, 7, 5, 11]  # 18 tokens: 2 blocks


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("tiny-spec")
    make_hf_checkpoint(path, tiny_hf_config("llama", vocab_size=16), seed=3)
    return load_model(path, load_tokenizer=False)


def plain_logits(loaded, tokens: list[int]) -> torch.Tensor:  # [vocab] after `tokens`
    runner = ModelRunner(loaded, KVCacheConfig(num_blocks=8))
    return runner.forward_logits(ModelBatch([SequenceChunk("p", tokens, 0, [0, 1, 2])]))[-1]


def prefilled_runner(loaded) -> ModelRunner:
    """A runner whose blocks [5, 2, 7] hold PROMPT[:-1] (scattered physical blocks)."""
    runner = ModelRunner(loaded, KVCacheConfig(num_blocks=8))
    runner.forward_logits(ModelBatch([SequenceChunk("r", PROMPT[:-1], 0, [5, 2, 7])]))
    return runner


def tree_chunk(tree: DraftTree, params: SamplingParams) -> SequenceChunk:
    sampling = SamplingRequest(params, PROMPT, ())
    return SequenceChunk(
        "r", [PROMPT[-1], *tree.tokens], len(PROMPT) - 1, [5, 2, 7], sampling, tree=tree
    )


def test_tree_logits_equal_sequential_logits_along_every_path(loaded) -> None:
    tree = DraftTree.from_paths([[1, 2, 3], [1, 4], [5, 6, 7, 8]])
    runner = prefilled_runner(loaded)
    chunk = tree_chunk(tree, SamplingParams(temperature=0))
    logits = runner.forward_logits(ModelBatch([chunk]))  # [1 + nodes, vocab]
    assert torch.allclose(logits[0], plain_logits(loaded, PROMPT), atol=1e-5)
    for node in range(len(tree)):
        path = [tree.tokens[n] for n in tree.path_to(node)]
        expected = plain_logits(loaded, PROMPT + path)
        assert (logits[node + 1] - expected).abs().max() < 1e-5, (node, path)


def greedy_continuation(loaded, num_tokens: int) -> list[int]:
    tokens = list(PROMPT)
    for _ in range(num_tokens):
        tokens.append(int(plain_logits(loaded, tokens).argmax()))
    return tokens[len(PROMPT):]


def test_greedy_verification_emits_plain_tokens_and_moves_their_kv(loaded) -> None:
    truth = greedy_continuation(loaded, 4)
    wrong = (truth[0] + 1) % 16
    # The true path is the *second* branch, so its nodes sit at tree slots that
    # differ from their final slots: the KV move is exercised.
    tree = DraftTree.from_paths([[wrong, 1, 2], truth[:3]])
    runner = prefilled_runner(loaded)
    out = runner.execute(ModelBatch([tree_chunk(tree, SamplingParams(temperature=0))]))
    assert out.token_ids == truth[:4]
    assert out.request_ids == ["r"] * 4
    # The cache now holds PROMPT + truth[:3] in place: decoding on from it must
    # equal plain decoding (a stale tree slot would change these logits).
    next_chunk = SequenceChunk("r", [truth[3]], len(PROMPT) + 3, [5, 2, 7])
    logits = runner.forward_logits(ModelBatch([next_chunk]))[-1]
    assert torch.allclose(logits, plain_logits(loaded, PROMPT + truth[:4]), atol=1e-5)


def _accept_likely_drafts(tree: DraftTree, drawn: list[int], argmax: list[int]) -> list[int]:
    """A deliberately wrong rule: a draft that is its row's most likely token is
    accepted even when the draw said otherwise (greedy leaking into sampling)."""
    fixed = list(drawn)
    for row in range(len(tree) + 1):
        kids = {tree.tokens[c] for c in tree.children(row - 1)}
        if argmax[row] in kids:
            fixed[row] = argmax[row]
    return fixed


@pytest.mark.parametrize("rule", ["lossless", "wrong"])
def test_sampled_verification_follows_the_target_distribution(loaded, rule: str) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95)
    first = torch.softmax(plain_logits(loaded, PROMPT) / 0.9, dim=-1)
    top = first.argsort(descending=True).tolist()
    after = torch.softmax(plain_logits(loaded, [*PROMPT, top[0]]) / 0.9, dim=-1)
    second = after.argsort(descending=True).tolist()
    # The target's likely tokens as drafts: a tree with two levels to check.
    tree = DraftTree.from_paths([[top[0], second[0]], [top[1]], [top[2]]])
    runner = prefilled_runner(loaded)
    chunk = tree_chunk(tree, params)
    logits = runner.forward_logits(ModelBatch([chunk]))  # [rows, vocab]
    draws = 10_000
    # One verification of 10,000 copies of the tree (unseeded: independent draws).
    results = verify_trees(logits.repeat(draws, 1), [chunk] * draws, runner.sampler)
    if rule == "lossless":
        emitted = [r.acceptance.token_ids[:2] for r in results]
    else:
        argmax = logits.argmax(dim=-1).tolist()
        drawn = runner.sampler.sample(
            logits.repeat(draws, 1), row_requests(chunk) * draws
        ).token_ids
        rows = len(tree) + 1
        emitted = [
            accept_path(tree, _accept_likely_drafts(tree, drawn[i * rows:(i + 1) * rows],
                                                    argmax)).token_ids[:2]
            for i in range(draws)
        ]
    counts = Counter(emitted)

    def nucleus(probs: torch.Tensor) -> dict[int, float]:
        # Independent top-p reference: the smallest top set reaching 0.95.
        order = probs.argsort(descending=True).tolist()
        kept, mass = [], 0.0
        for t in order:
            kept.append(t)
            mass += float(probs[t])
            if mass >= 0.95:
                break
        total = sum(float(probs[t]) for t in kept)
        return {t: float(probs[t]) / total for t in kept}

    firsts: Counter = Counter()
    for (t1, *_), n in counts.items():
        firsts[t1] += n
    seconds = Counter({rest[0]: n for (t1, *rest), n in counts.items() if t1 == top[0] and rest})
    assert sum(seconds.values()) == firsts[top[0]]  # an accepted node always emits a second
    p_first = chi_square_p_value(firsts, nucleus(first))
    p_second = chi_square_p_value(seconds, nucleus(after))
    if rule == "lossless":
        assert p_first > 1e-3 and p_second > 1e-3, (p_first, p_second)
    else:
        assert min(p_first, p_second) < 1e-6, (p_first, p_second)

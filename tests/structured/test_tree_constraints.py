"""Constrained tree verification stays lossless: with a mask on the root row and a
different one on each node's row, the emitted tokens follow the target's distribution
renormalised over each position's allowed tokens (chi-square over 10,000 verifications
on a tiny random model); leaving the nodes' masks out is caught."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from chi_square import chi_square_p_value
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import SamplingParams, load_model
from streamgen.runner.batch import ModelBatch, SamplingRequest, SequenceChunk
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner
from streamgen.spec.tree import DraftTree
from streamgen.spec.verify import verify_trees

VOCAB = 16
PROMPT = [3, 9, 4, 12, 7, 5, 11, 6, 8, 10, 13, 3, 9, 4, 12, 7, 5, 11]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("tiny-constrained-spec")
    make_hf_checkpoint(path, tiny_hf_config("llama", vocab_size=VOCAB), seed=3)
    return load_model(path, load_tokenizer=False)


def mask_of(tokens: list[int]) -> np.ndarray:
    mask = np.zeros(1, dtype=np.uint32)
    for t in tokens:
        mask[0] |= np.uint32(1 << t)
    return mask.view(np.int32)


def logits_after(loaded, tokens: list[int]) -> torch.Tensor:
    runner = ModelRunner(loaded, KVCacheConfig(num_blocks=8))
    return runner.forward_logits(ModelBatch([SequenceChunk("p", tokens, 0, [0, 1, 2])]))[-1]


def restricted(logits: torch.Tensor, allowed: list[int], temperature: float) -> dict[int, float]:
    probs = torch.softmax(logits[allowed] / temperature, dim=0)
    return {t: float(p) for t, p in zip(allowed, probs, strict=True)}


@pytest.mark.parametrize("node_masks", ["applied", "left out"])
def test_constrained_verification_follows_the_masked_distribution(
    loaded, node_masks: str
) -> None:
    temperature = 0.9
    first = logits_after(loaded, PROMPT)
    order = first.argsort(descending=True).tolist()
    root_allowed = sorted(order[1:6])  # the model's favourite is not allowed
    a, b = order[1], order[2]
    after_a = logits_after(loaded, [*PROMPT, a])
    second_order = after_a.argsort(descending=True).tolist()
    node_allowed = sorted(second_order[2:7])  # after a: its two favourites are not allowed
    tree = DraftTree.from_paths([[a, second_order[2]], [b]])
    masks = {0: mask_of(node_allowed), 1: mask_of(sorted({*range(VOCAB)} - {a})),
             2: mask_of(list(range(VOCAB)))}  # fmt: skip
    params = SamplingParams(temperature=temperature)
    sampling = SamplingRequest(params, PROMPT, (), mask_of(root_allowed))
    chunk = SequenceChunk(
        "r", [PROMPT[-1], *tree.tokens], len(PROMPT) - 1, [5, 2, 7], sampling, tree=tree,
        tree_allowed=(masks[0], masks[1], masks[2]) if node_masks == "applied" else (),
    )  # fmt: skip
    runner = ModelRunner(loaded, KVCacheConfig(num_blocks=8))
    runner.forward_logits(ModelBatch([SequenceChunk("r", PROMPT[:-1], 0, [5, 2, 7])]))
    logits = runner.forward_logits(ModelBatch([chunk]))  # [rows, vocab]
    draws = 10_000
    results = verify_trees(logits.repeat(draws, 1), [chunk] * draws, runner.sampler)
    firsts = Counter(r.acceptance.token_ids[0] for r in results)
    seconds = Counter(r.acceptance.token_ids[1] for r in results
                      if r.acceptance.token_ids[0] == a)  # fmt: skip
    assert set(firsts) <= set(root_allowed)
    p_first = chi_square_p_value(firsts, restricted(first, root_allowed, temperature))
    p_second = chi_square_p_value(seconds, restricted(after_a, node_allowed, temperature))
    if node_masks == "applied":
        assert set(seconds) <= set(node_allowed)
        assert p_first > 1e-3 and p_second > 1e-3, (p_first, p_second)
    else:
        assert p_second < 1e-6, p_second

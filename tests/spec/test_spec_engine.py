"""Speculation inside the engine core: greedy output identical to plain
decoding for every drafter, under batching, chunked prefill, preemption
(both modes) and cancellations, with exact block accounting after every step."""

from __future__ import annotations

from pathlib import Path

import pytest
from core_harness import run_core
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import SamplingParams, load_model
from streamgen.spec.config import SpeculationConfig

GREEDY = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = tmp_path_factory.mktemp("tiny-spec-engine")
    make_hf_checkpoint(path, tiny_hf_config("llama", vocab_size=64), seed=5)
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint: Path):
    return load_model(checkpoint, load_tokenizer=False)


def prompts(n: int) -> list[list[int]]:
    """Repetitive prompts of different lengths (n-gram matches exist), across blocks."""
    base = [5, 9, 13, 7, 21, 8, 30, 11]
    return [[*(base * 6)[i : i + 10 + 7 * i], 3 + i] for i in range(n)]


CONFIGS = {
    "ngram": SpeculationConfig("ngram", max_nodes=6, max_depth=4, min_ngram=1, adaptive=False),
    "self": SpeculationConfig("self", max_nodes=6, max_depth=3, self_layers=2, adaptive=False),
    "draft_model": SpeculationConfig("draft_model", max_nodes=6, max_depth=3, draft_model="x",
                                     adaptive=False),
}


@pytest.fixture(scope="module")
def plain(loaded) -> dict[int, dict[str, list[int]]]:
    """Greedy outputs without speculation, per batch size."""
    return {batch: run_core(loaded, prompts(batch), GREEDY).outputs for batch in (1, 8)}


def spec_run(loaded, name: str, batch: int, **kwargs):
    draft = loaded if name == "draft_model" else None
    return run_core(loaded, prompts(batch), GREEDY, CONFIGS[name], draft=draft, **kwargs)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_output_is_identical_with_speculation(
    loaded, plain, name: str, batch: int
) -> None:
    spec = spec_run(loaded, name, batch, budget=24)  # budget 24: prompts prefill in chunks
    assert spec.outputs == plain[batch]
    total = spec.core.spec.metrics
    assert total.verify_steps > 0 and total.accepted_tokens > 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_identical_under_preemption_and_cancellation(loaded, plain, name: str, mode: str) -> None:
    cancelled = {3: ["r2"], 9: ["r5"]}
    spec = spec_run(
        loaded, name, 8, num_blocks=10, budget=32, preemption_mode=mode,
        num_host_blocks=32 if mode == "swap" else 0, cancel=lambda step: cancelled.get(step, []),
    )
    assert spec.preemptions > 0
    for rid, tokens in spec.outputs.items():
        if rid in ("r2", "r5"):
            assert tokens == plain[8][rid][: len(tokens)]
            continue
        assert tokens == plain[8][rid], rid
    assert spec.finish["r2"] == "abort" and spec.finish["r5"] == "abort"


def test_draft_equal_to_target_accepts_every_draft_token(loaded) -> None:
    config = SpeculationConfig("draft_model", max_nodes=4, max_depth=4, branching=1,
                               draft_model="x", adaptive=False)
    run = run_core(loaded, prompts(4), GREEDY, config, draft=loaded)
    total = run.core.spec.metrics
    assert total.draft_tokens > 50
    assert total.accepted_tokens == total.draft_tokens
    for metrics in run.metrics.values():
        assert metrics.acceptance_rate == 1.0
        assert metrics.mean_accepted_length > 3


def test_per_request_switch_off_is_respected(loaded) -> None:
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, speculation=False)
    run = run_core(loaded, prompts(2), params, CONFIGS["ngram"])
    assert run.core.spec.metrics.verify_steps == 0

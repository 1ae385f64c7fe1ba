"""ModelRunner and OfflineGenerator on a tiny model: input checks, seeds, block accounting."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import OfflineGenerator, SamplingParams, load_model
from streamgen.errors import CapacityError, InvalidPromptError
from streamgen.runner.batch import ModelBatch, SamplingRequest, SequenceChunk
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("tiny")
    make_hf_checkpoint(path, tiny_hf_config("llama"))
    return load_model(path, load_tokenizer=False)


def test_short_block_table_is_rejected(loaded) -> None:
    runner = ModelRunner(loaded, KVCacheConfig(num_blocks=4))
    with pytest.raises(InvalidPromptError, match="need 2 blocks"):
        runner.execute(ModelBatch([SequenceChunk("a", list(range(3, 20)), 0, [0])]))


def test_token_outside_vocabulary_is_rejected(loaded) -> None:
    runner = ModelRunner(loaded, KVCacheConfig(num_blocks=4))
    with pytest.raises(InvalidPromptError, match="vocabulary"):
        runner.execute(ModelBatch([SequenceChunk("a", [3, loaded.spec.vocab_size], 0, [0])]))


def test_block_id_outside_pool_is_rejected(loaded) -> None:
    runner = ModelRunner(loaded, KVCacheConfig(num_blocks=4))
    with pytest.raises(InvalidPromptError, match="out of range"):
        runner.execute(ModelBatch([SequenceChunk("a", [3, 4], 0, [4])]))


def test_only_sampling_chunks_return_tokens(loaded) -> None:
    runner = ModelRunner(loaded, KVCacheConfig(num_blocks=8))
    greedy = SamplingRequest(SamplingParams(temperature=0), [3, 4, 5], ())
    out = runner.execute(
        ModelBatch(
            [
                SequenceChunk("prefill-part", [3, 4, 5, 6], 0, [0]),
                SequenceChunk("done", [3, 4, 5], 0, [1], greedy),
            ]
        )
    )
    assert out.request_ids == ["done"]
    logits = runner.forward_logits(ModelBatch([SequenceChunk("x", [3, 4, 5], 0, [2])]))
    assert out.token_ids == [int(logits[-1].argmax())]


def test_seeded_request_is_independent_of_its_batch(loaded) -> None:
    generator = OfflineGenerator(loaded, KVCacheConfig(num_blocks=64))
    seeded = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True, seed=7)
    others = SamplingParams(temperature=1.2, max_tokens=30, ignore_eos=True)
    prompt = list(range(10, 40))
    alone = generator.generate([prompt], seeded)[0]
    batched = generator.generate(
        [list(range(50, 53)), prompt, list(range(60, 95))], [others, seeded, others]
    )[1]
    assert alone == batched
    assert generator.generate([prompt], SamplingParams(
        temperature=1.0, top_p=0.95, max_tokens=24, ignore_eos=True, seed=8))[0] != alone
    assert generator.blocks.num_free_blocks == generator.blocks.num_total_blocks


def test_stop_conditions(loaded) -> None:
    generator = OfflineGenerator(loaded, KVCacheConfig(num_blocks=32))
    prompt = list(range(10, 20))
    free_run = generator.generate([prompt], SamplingParams(temperature=0, max_tokens=12,
                                                           ignore_eos=True))[0]
    assert len(free_run) == 12
    stop_at = free_run[5]
    stopped = generator.generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_at])
    )[0]
    assert stopped == free_run[: free_run.index(stop_at) + 1]
    with pytest.raises(InvalidPromptError, match="empty"):
        generator.generate([[]], SamplingParams())


def test_offline_generator_preempts_when_the_pool_is_short(loaded) -> None:
    """Six requests growing to 5 blocks each in a 12-block pool: the scheduler
    preempts (recompute) instead of failing, and every output equals the output
    of an unconstrained run; no block is left behind."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    prompts = [list(range(10 + i, 50 + i)) for i in range(6)]
    ample = OfflineGenerator(loaded, KVCacheConfig(num_blocks=64)).generate(prompts, params)
    tight = OfflineGenerator(loaded, KVCacheConfig(num_blocks=12))
    assert tight.generate(prompts, params) == ample
    assert tight.blocks.num_free_blocks == tight.blocks.num_total_blocks
    with pytest.raises(CapacityError, match="KV blocks"):
        tight.generate([list(range(3, 3 + 13 * 16))], params)  # the prompt alone needs 13


def test_offline_stream_closed_early_frees_its_blocks(loaded) -> None:
    generator = OfflineGenerator(loaded, KVCacheConfig(num_blocks=16))
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    full = generator.generate([list(range(5, 40))], params)[0]
    stream = generator.stream(list(range(5, 40)), params)
    assert [next(stream) for _ in range(4)] == full[:4]
    stream.close()
    assert generator.blocks.num_free_blocks == generator.blocks.num_total_blocks

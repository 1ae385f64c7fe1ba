"""Speculation through the public API: Engine + EngineConfig(speculation=...)
under asyncio and trio; metrics per request and in stats(); config errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import Engine, EngineConfig, SamplingParams, SpeculationConfig, load_model
from streamgen.errors import ConfigError, InvalidSamplingParamsError

PROMPT = [5, 9, 13, 7, 21, 8, 30, 11] * 4 + [5, 9]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory):
    path: Path = tmp_path_factory.mktemp("tiny-spec-api")
    make_hf_checkpoint(path, tiny_hf_config("llama", vocab_size=64), seed=5)
    return load_model(path, load_tokenizer=False)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_stream_with_speculation_reports_metrics(loaded) -> None:
    async with Engine(loaded, EngineConfig(num_kv_blocks=32)) as engine:
        expected = [e.token_id async for e in engine.stream(PROMPT, GREEDY)]
    config = EngineConfig(
        num_kv_blocks=32,
        speculation=SpeculationConfig("ngram", max_nodes=6, max_depth=4, min_ngram=1,
                                      adaptive=False),
    )
    async with Engine(loaded, config) as engine:
        stream = engine.stream(PROMPT, GREEDY)
        events = [e async for e in stream]
        stats = engine.stats()
    assert [e.token_id for e in events] == expected
    assert [e.index for e in events] == list(range(len(events)))
    assert events[-1].finish_reason == "length"
    spec = stream.metrics.speculation
    assert spec.verify_steps > 0 and spec.draft_tokens >= spec.accepted_tokens > 0
    assert stats["speculation"]["method"] == "ngram"
    assert stats["speculation"]["accepted_tokens"] == spec.accepted_tokens
    assert stats["kv_blocks_used"] == 0


@pytest.mark.anyio
async def test_seeded_sampling_gives_the_same_tokens_with_and_without_speculation(loaded) -> None:
    # Each row's draw depends only on (seed, output position): the tree shape,
    # the drafter and the batch around the request cannot change the output.
    params = SamplingParams(temperature=0.8, top_k=20, max_tokens=16, seed=11, ignore_eos=True)
    outputs = []
    for spec in (None, SpeculationConfig("self", self_layers=2),
                 SpeculationConfig("ngram", min_ngram=1, adaptive=False)):
        async with Engine(loaded, EngineConfig(num_kv_blocks=32, speculation=spec)) as engine:
            outputs.append([e.token_id async for e in engine.stream(PROMPT, params)])
    assert outputs[0] == outputs[1] == outputs[2] and len(outputs[0]) == 16


def test_bad_speculation_settings_are_typed_errors(loaded) -> None:
    with pytest.raises(ConfigError, match="method"):
        SpeculationConfig("magic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="draft_model"):
        SpeculationConfig("draft_model")
    with pytest.raises(ConfigError, match="max_nodes"):
        SpeculationConfig(max_nodes=0)
    with pytest.raises(ConfigError, match="SpeculationConfig"):
        EngineConfig(speculation="ngram")  # type: ignore[arg-type]
    with pytest.raises(InvalidSamplingParamsError, match="speculation"):
        SamplingParams(speculation="yes")  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_self_layers_must_leave_layers_to_skip(loaded) -> None:
    config = EngineConfig(
        num_kv_blocks=8, max_model_len=128, speculation=SpeculationConfig("self", self_layers=3)
    )
    with pytest.raises(ConfigError, match="self_layers"):
        await Engine(loaded, config).start()


def test_sliding_window_models_branch_where_the_backend_counts_windows_from_depth(
    tmp_path: Path,
) -> None:
    """A windowed model's drafts branch on the backends whose window over a tree counts
    from each node's depth (every built-in one), and are chains on a backend that does
    not say so (a third party's), whose verify steps carry no tree mask (a causal
    chunk: every backend applies the window); a branching tree keeps its mask."""
    from streamgen.attention.flex import FlexAttentionBackend
    from streamgen.attention.torch_ref import TorchReferenceBackend
    from streamgen.runner.batch import ModelBatch, SequenceChunk
    from streamgen.runner.kv_cache import KVCacheConfig
    from streamgen.runner.model_runner import ModelRunner
    from streamgen.spec.factory import make_drafter, speculation_for
    from streamgen.spec.tree import DraftTree

    make_hf_checkpoint(tmp_path, tiny_hf_config("mistral", sliding_window=24))
    mistral = load_model(tmp_path, load_tokenizer=False)
    runner = ModelRunner(mistral, KVCacheConfig(num_blocks=4))
    assert runner.backend.windowed_trees
    assert speculation_for(SpeculationConfig(branching=3), mistral, runner.backend).branching == 3
    flex = FlexAttentionBackend.__new__(FlexAttentionBackend)  # nothing compiled
    assert speculation_for(SpeculationConfig(branching=3), mistral, flex).branching == 3

    class SlotWindowBackend(TorchReferenceBackend):  # windows trees from the rows' slots
        windowed_trees = False

    slots = SlotWindowBackend()
    assert speculation_for(SpeculationConfig(branching=3), mistral, slots).branching == 1
    assert make_drafter(SpeculationConfig(), mistral, runner).name == "ngram"

    def mask(tree: DraftTree) -> object:
        chunk = SequenceChunk("r", [5] * (len(tree) + 1), 20, [0, 1], tree=tree)
        return runner.prepare(ModelBatch([chunk])).metadata.tree_mask

    assert mask(DraftTree.chain([7, 8, 9])) is None
    assert mask(DraftTree.from_paths([[7, 8], [9]])) is not None

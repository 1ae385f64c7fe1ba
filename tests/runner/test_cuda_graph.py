"""CUDA-graph decode (runner/cuda_graph.py).

On the CPU the padded static-buffer step runs eagerly (``capture=False``) with
the Triton kernels under the interpreter: the same code path as a replay,
minus the capture. GPU tests capture and replay.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from helpers import make_hf_checkpoint, tiny_hf_config

from streamgen import SamplingParams, load_model
from streamgen.attention.triton_backend import TritonAttentionBackend
from streamgen.checkpoint.loader import LoadedModel
from streamgen.engine.config import EngineConfig
from streamgen.errors import ConfigError, InvalidPromptError
from streamgen.runner.batch import ModelBatch, SamplingRequest, SequenceChunk
from streamgen.runner.cuda_graph import (
    CudaGraphConfig,
    capture_batch_sizes,
    kv_config_after_reserve,
    select_bucket,
)
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner
from streamgen.spec.tree import DraftTree

NUM_BLOCKS = 24  # blocks the block manager may use; the graph runner adds one scratch block
MAX_MODEL_LEN = 64
PARTITION = 16  # split-K partition: a 64-token plan has 4 partitions, most rows use fewer
GREEDY = SamplingRequest(SamplingParams(temperature=0), [1], ())
GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path: Path = tmp_path_factory.mktemp("tiny")
    make_hf_checkpoint(path, tiny_hf_config("llama"))
    return load_model(path, load_tokenizer=False)


def make_runner(
    loaded: LoadedModel,
    graphs: CudaGraphConfig | None = None,
    backend: str = "triton",
    num_blocks: int = NUM_BLOCKS,
) -> ModelRunner:
    """A runner whose usable pool is ``num_blocks`` blocks, with or without graphs."""
    pool = KVCacheConfig(num_blocks=num_blocks + (graphs is not None))
    if backend == "triton":
        triton = TritonAttentionBackend(decode_partition_size=PARTITION)
        return ModelRunner(loaded, pool, backend=triton, cuda_graphs=graphs)
    return ModelRunner(loaded, pool, backend=backend, cuda_graphs=graphs)


@dataclass
class Sequences:
    """Prompts already in the cache, each with its own scattered blocks."""

    tokens: list[list[int]]
    tables: list[list[int]]

    def decode_batch(self, next_tokens: list[int] | None = None) -> ModelBatch:
        next_tokens = next_tokens or [7 + i for i in range(len(self.tokens))]
        return ModelBatch([
            SequenceChunk(f"s{i}", [token], len(prompt), table, GREEDY)
            for i, (prompt, table, token) in enumerate(
                zip(self.tokens, self.tables, next_tokens, strict=True)
            )
        ])  # fmt: skip


def prefill(
    runners: list[ModelRunner], lengths: list[int], seed: int = 0, room: int = 1
) -> Sequences:
    """Prefill the same prompts into the same (scattered) blocks of every runner."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(runners[0].num_blocks, generator=generator).tolist()
    tokens, tables = [], []
    for length in lengths:
        num = -(-(length + room) // 16)  # room for the decode tokens
        tables.append([order.pop() for _ in range(num)])
        tokens.append(torch.randint(3, 200, (length,), generator=generator).tolist())
    batch = ModelBatch([
        SequenceChunk(f"s{i}", prompt, 0, table) for i, (prompt, table) in enumerate(
            zip(tokens, tables, strict=True))
    ])  # fmt: skip
    for runner in runners:
        runner.execute(batch)
    return Sequences(tokens, tables)


def cache_bytes(runner: ModelRunner) -> list[torch.Tensor]:  # per layer [2, blocks, 16, kv, dim]
    return [torch.stack((k, v)).clone() for k, v in runner.kv_cache.layers]


# ----- buckets and configuration ---------------------------------------------------------


@pytest.mark.parametrize(("max_batch_size", "expected"), [
    (1, (1,)), (3, (1, 2, 4)), (8, (1, 2, 4, 8)), (9, (1, 2, 4, 8, 16)),
    (20, (1, 2, 4, 8, 16, 24)), (64, (1, 2, 4, 8, *range(16, 65, 8))),
])  # fmt: skip
def test_capture_batch_sizes(max_batch_size: int, expected: tuple[int, ...]) -> None:
    assert capture_batch_sizes(max_batch_size) == expected


def test_select_bucket_takes_the_smallest_that_fits() -> None:
    sizes = capture_batch_sizes(24)
    assert [select_bucket(sizes, n) for n in (1, 2, 3, 5, 8, 9, 17, 24, 25)] == [
        1, 2, 4, 8, 8, 16, 24, 24, None
    ]


def test_configs_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_batch_size"):
        CudaGraphConfig(0, 128)
    with pytest.raises(ConfigError, match="max_model_len"):
        CudaGraphConfig(8, True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cuda_graphs"):
        EngineConfig(cuda_graphs="yes")  # type: ignore[arg-type]
    assert EngineConfig().cuda_graphs is False
    assert EngineConfig.preset("low_latency").cuda_graphs is True
    assert EngineConfig.preset("low_latency", cuda_graphs=False).cuda_graphs is False


def test_kv_pool_shrinks_to_leave_room_for_the_graphs() -> None:
    by_bytes = KVCacheConfig(memory_bytes=1000)
    assert kv_config_after_reserve(by_bytes, 300, 2000, 10).memory_bytes == 1000
    assert kv_config_after_reserve(by_bytes, 300, 1100, 10).memory_bytes == 800
    with pytest.raises(ConfigError, match="no room"):
        kv_config_after_reserve(by_bytes, 300, 310, 10)
    fixed = KVCacheConfig(num_blocks=50)
    assert kv_config_after_reserve(fixed, 300, 800, 10) == fixed
    with pytest.raises(ConfigError, match="exceed the free device memory"):
        kv_config_after_reserve(fixed, 300, 700, 10)


def test_capture_needs_a_cuda_device(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        pytest.skip("the model is on a GPU")
    with pytest.raises(ConfigError, match="CUDA device"):
        make_runner(loaded, CudaGraphConfig(8, MAX_MODEL_LEN))


# ----- the padded step, eagerly on the CPU -----------------------------------------------


def test_padded_step_matches_eager_and_writes_only_new_slots(loaded: LoadedModel) -> None:
    """5 decodes padded to bucket 8, against the eager step over the same 5 rows
    plus 3 real companions (the same matmul shapes: CPU and GPU GEMMs are not
    batch-size invariant, so rows computed in a 5-row matmul differ from an
    8-row one in the last bits) and against the unpadded 5-row eager step."""
    plain = make_runner(loaded)
    padded = make_runner(loaded, CudaGraphConfig(8, MAX_MODEL_LEN, capture=False))
    assert padded.num_blocks == NUM_BLOCKS == padded.kv_cache.num_blocks - 1
    everyone = prefill([plain, padded], [3, 17, 30, 9, 40, 12, 25, 6])
    sequences = Sequences(everyone.tokens[:5], everyone.tables[:5])
    batch = sequences.decode_batch()
    before = cache_bytes(padded)

    same_shapes = plain.forward_logits(everyone.decode_batch())[:5]  # [5, vocab] of 8 rows
    reference_cache = cache_bytes(plain)
    unpadded = plain.forward_logits(batch)  # [5, vocab], a 5-row eager step
    assert padded.graphs is not None and padded.graphs.can_run(batch)
    logits = padded.graphs.run(batch)  # [5, vocab], bucket 8 with 3 padding rows

    assert torch.equal(logits, same_shapes)
    torch.testing.assert_close(logits, unpadded, rtol=0, atol=1e-5)
    after = cache_bytes(padded)
    new_slots = {(t[len(p) // 16], len(p) % 16) for p, t in zip(
        sequences.tokens, sequences.tables, strict=True)}  # fmt: skip
    scratch = padded.graphs.scratch_block
    for layer, (old, new, reference) in enumerate(
        zip(before, after, reference_cache, strict=True)
    ):
        for block in range(NUM_BLOCKS):
            for offset in range(16):
                if (block, offset) in new_slots:
                    assert torch.equal(new[:, block, offset], reference[:, block, offset])
                else:
                    assert torch.equal(new[:, block, offset], old[:, block, offset]), (
                        f"layer {layer}: padding wrote into block {block} offset {offset}"
                    )
        assert not torch.equal(new[:, scratch], old[:, scratch])  # padding went here


def test_greedy_decoding_through_execute_matches_the_eager_runner(loaded: LoadedModel) -> None:
    plain = make_runner(loaded)
    padded = make_runner(loaded, CudaGraphConfig(4, MAX_MODEL_LEN, capture=False))
    sequences = prefill([plain, padded], [5, 14, 20], seed=1, room=4)  # 3 rows: bucket 4
    next_tokens = [7, 8, 9]
    for _ in range(4):  # crosses the block boundary of the 14- and 20-token prompts
        batch = sequences.decode_batch(next_tokens)
        expected = plain.execute(batch)
        got = padded.execute(batch)
        assert got.token_ids == expected.token_ids
        assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
        for prompt, token in zip(sequences.tokens, next_tokens, strict=True):
            prompt.append(token)
        next_tokens = got.token_ids


def test_runner_without_graph_safe_backend_gets_a_triton_one(loaded: LoadedModel) -> None:
    padded = make_runner(loaded, CudaGraphConfig(2, MAX_MODEL_LEN, capture=False), "torch")
    reference = make_runner(loaded, backend="torch")
    assert padded.backend.name == "torch"
    assert padded.graphs is not None and padded.graphs.backend.name == "triton"
    sequences = prefill([padded, reference], [6, 21])
    batch = sequences.decode_batch()
    torch.testing.assert_close(
        padded.graphs.run(batch), reference.forward_logits(batch), rtol=1e-4, atol=1e-4
    )


def test_eager_fallback_conditions(loaded: LoadedModel) -> None:
    runner = make_runner(loaded, CudaGraphConfig(4, MAX_MODEL_LEN, capture=False))
    graphs = runner.graphs
    assert graphs is not None

    def chunk(tokens: tuple[int, ...] = (5,), start: int = 3, **kwargs: object) -> SequenceChunk:
        kwargs.setdefault("sampling", GREEDY)
        return SequenceChunk("r", tokens, start, [0, 1, 2, 3], **kwargs)  # type: ignore[arg-type]

    assert graphs.can_run(ModelBatch([chunk()] * 4))
    assert not graphs.can_run(ModelBatch([]))
    assert not graphs.can_run(ModelBatch([chunk()] * 5))  # above the largest bucket
    assert not graphs.can_run(ModelBatch([chunk(), chunk((5, 6))]))  # a prefill chunk
    assert not graphs.can_run(ModelBatch([chunk(sampling=None)]))  # nothing to sample
    assert not graphs.can_run(ModelBatch([chunk(start=MAX_MODEL_LEN)]))  # past max_model_len
    tree = chunk((5, 6, 7), tree=DraftTree.chain([6, 7]))
    assert not graphs.can_run(ModelBatch([tree]))


def test_mixed_batches_run_eagerly_with_the_same_result(loaded: LoadedModel) -> None:
    plain = make_runner(loaded)
    padded = make_runner(loaded, CudaGraphConfig(4, MAX_MODEL_LEN, capture=False))
    sequences = prefill([plain, padded], [4, 11])
    decode = sequences.decode_batch()
    mixed = ModelBatch([*decode.chunks, SequenceChunk("new", [3, 4, 5], 0, [23], GREEDY)])
    assert padded.graphs is not None and not padded.graphs.can_run(mixed)
    assert padded.execute(mixed).token_ids == plain.execute(mixed).token_ids


def test_scratch_block_is_never_a_real_block(loaded: LoadedModel) -> None:
    runner = make_runner(loaded, CudaGraphConfig(2, MAX_MODEL_LEN, capture=False))
    assert runner.graphs is not None
    scratch = runner.graphs.scratch_block
    bad = ModelBatch([SequenceChunk("r", [5], 0, [scratch], GREEDY)])
    with pytest.raises(InvalidPromptError, match="block id out of range"):
        runner.graphs.run(bad)
    with pytest.raises(InvalidPromptError, match="block id out of range"):
        runner.prepare(bad)


# ----- capture and replay (GPU) ----------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    path: Path = tmp_path_factory.mktemp("tiny-gpu")
    make_hf_checkpoint(path, tiny_hf_config("llama"))
    return load_model(path, device="cuda", load_tokenizer=False)


def _gpu_runners(
    loaded: LoadedModel, max_batch_size: int
) -> tuple[ModelRunner, ModelRunner, ModelRunner]:
    """(plain eager, padded eager, captured): same model, same usable pool."""
    num_blocks = 3 * max_batch_size + 8  # 3 blocks hold a 41-token context
    return (
        make_runner(loaded, num_blocks=num_blocks),
        make_runner(loaded, CudaGraphConfig(max_batch_size, MAX_MODEL_LEN, capture=False),
                    num_blocks=num_blocks),
        make_runner(loaded, CudaGraphConfig(max_batch_size, MAX_MODEL_LEN),
                    num_blocks=num_blocks),
    )  # fmt: skip


@pytest.mark.gpu
@GPU
@pytest.mark.parametrize(("num_seqs", "bucket"), [(1, 1), (7, 8), (8, 8), (23, 24)])
def test_replay_matches_eager(gpu_loaded: LoadedModel, num_seqs: int, bucket: int) -> None:
    plain, padded, captured = _gpu_runners(gpu_loaded, 24)
    assert select_bucket(capture_batch_sizes(24), num_seqs) == bucket
    lengths = [(5 + 7 * i) % 40 + 1 for i in range(num_seqs)]
    sequences = prefill([plain, padded, captured], lengths)
    batch = sequences.decode_batch([3 + i for i in range(num_seqs)])
    expected = plain.forward_logits(batch)
    assert padded.graphs is not None and captured.graphs is not None
    same_path = padded.graphs.run(batch).clone()
    replayed = captured.graphs.run(batch).clone()
    assert torch.equal(replayed, same_path)  # a replay is the eager padded step, bit for bit
    torch.testing.assert_close(replayed, expected, rtol=1e-4, atol=1e-4)
    for (k_old, v_old), (k_new, v_new) in zip(
        padded.kv_cache.layers, captured.kv_cache.layers, strict=True
    ):
        assert torch.equal(k_old[:-1], k_new[:-1]) and torch.equal(v_old[:-1], v_new[:-1])


@pytest.mark.gpu
@GPU
def test_replay_after_block_tables_change(gpu_loaded: LoadedModel) -> None:
    plain, _, captured = _gpu_runners(gpu_loaded, 8)
    first = prefill([plain, captured], [9, 30, 17], seed=2)
    assert captured.graphs is not None
    captured.graphs.run(first.decode_batch())
    plain.forward_logits(first.decode_batch())
    # New sequences in other blocks (a fresh permutation), longer tables, another bucket.
    second = prefill([plain, captured], [33, 2, 47, 15, 20], seed=3)
    batch = second.decode_batch()
    torch.testing.assert_close(
        captured.graphs.run(batch), plain.forward_logits(batch), rtol=1e-4, atol=1e-4
    )


@pytest.mark.gpu
@GPU
def test_greedy_decoding_with_graphs_matches_eager_on_gpu(gpu_loaded: LoadedModel) -> None:
    plain, _, captured = _gpu_runners(gpu_loaded, 8)
    sequences = prefill([plain, captured], [5, 14, 20, 31, 2], seed=4, room=12)
    next_tokens = [7, 8, 9, 10, 11]
    for _ in range(12):
        batch = sequences.decode_batch(next_tokens)
        expected, got = plain.execute(batch), captured.execute(batch)
        assert got.token_ids == expected.token_ids
        for prompt, token in zip(sequences.tokens, next_tokens, strict=True):
            prompt.append(token)
        next_tokens = got.token_ids


# ----- the engine's wiring ---------------------------------------------------------------


async def _engine_greedy(loaded: LoadedModel, config: EngineConfig) -> tuple[list[int], dict]:
    from streamgen.engine import Engine

    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    async with Engine(loaded, config) as engine:
        tokens = [event.token_id async for event in engine.stream(list(range(3, 20)), params)]
        return tokens, engine.stats()


@pytest.mark.anyio
async def test_engine_ignores_cuda_graphs_off_the_gpu(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        pytest.skip("the model is on a GPU")
    _, stats = await _engine_greedy(loaded, EngineConfig(num_kv_blocks=32, cuda_graphs=True))
    assert stats["cuda_graphs"] is False
    assert stats["kv_blocks_total"] == 32


@pytest.mark.gpu
@GPU
@pytest.mark.anyio
async def test_engine_with_cuda_graphs_matches_eager(gpu_loaded: LoadedModel) -> None:
    config = EngineConfig(num_kv_blocks=33, attention_backend="triton", max_num_seqs=4)
    eager, eager_stats = await _engine_greedy(gpu_loaded, config)
    graphs = EngineConfig(num_kv_blocks=33, attention_backend="triton", max_num_seqs=4,
                          cuda_graphs=True)  # fmt: skip
    replayed, stats = await _engine_greedy(gpu_loaded, graphs)
    assert (eager_stats["cuda_graphs"], stats["cuda_graphs"]) == (False, True)
    assert stats["kv_blocks_total"] == 32  # one block is the graphs' scratch
    assert replayed == eager

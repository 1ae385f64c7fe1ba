"""CUDA-graph decode: replay a captured step for all-decode batches.

A decode step of a small model is hundreds of short kernels; launching them
one by one from Python costs more than running them. The step is captured
once per *bucket* (a padded batch size) and replayed::

    buckets   1, 2, 4, 8, 16, 24, ... (steps of 8 up to max_batch_size)
    a batch of 5 decodes runs in bucket 8:

    row            0   1   2   3   4 | 5   6   7
    input_ids      real decode tokens | 0   0   0
    positions      start_pos of each  | 0   0   0
    slot_mapping   its cache slot     | scratch slot (block S, offset 0)
    seq_lens       start_pos + 1      | 1   1   1
    block_tables   its blocks         | [S, ...]
    logits         read by the sampler| never read

Invariants:

* Everything the captured step reads lives in static buffers (device) that
  are filled before replay: host work (validation, flattening) goes into
  pinned buffers, then one non-blocking copy per buffer. Nothing inside the
  captured region syncs with the host (no ``.item()``, no ``.tolist()``); the
  graph ends with the logits of every row, and the sampler runs after replay.
* Padded rows write K/V only into the scratch block ``S`` (the last block of
  the KV pool, which the :class:`~streamgen.runner.ModelRunner` never hands
  out), so real blocks only ever receive the real rows' new tokens.
* The attention plan is made for ``max_model_len`` (``seq_lens_list``), so
  the split-K grid of a bucket is the same at every replay; the kernels read
  each row's real length from ``seq_lens``. Only backends with
  ``supports_cuda_graphs`` (Triton) are captured; any other backend keeps the
  eager steps and the graphs get a Triton backend of their own (same layout).
* All buckets share one memory pool; the largest is captured first, so the
  smaller ones reuse its memory. The pool is estimated by
  :func:`graph_memory_bytes` and set aside before the KV pool is sized
  (:func:`reserve_graph_memory`).

With ``CudaGraphConfig(capture=False)`` the same padded static-buffer step
runs eagerly: that is how the CPU tests check padding and scratch writes.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from streamgen.attention.backend import AttentionBackend, AttentionMetadata
from streamgen.errors import BackendUnavailableError, ConfigError
from streamgen.model.config import ModelSpec
from streamgen.model.llama import LlamaModel
from streamgen.runner.batch import ModelBatch, SequenceChunk
from streamgen.runner.input_prep import check_chunk
from streamgen.runner.kv_cache import KVCacheConfig, PagedKVCache, bytes_per_block

_SPLIT_K_PARTITIONS = 64  # triton_backend.MAX_DECODE_PARTITIONS: an upper bound for the estimate
_PADDING_TOKEN = 0


@dataclass(frozen=True, slots=True)
class CudaGraphConfig:
    """Which decode steps are captured.

    Attributes:
        max_batch_size: Largest batch to capture (the engine's ``max_num_seqs``);
            the last bucket is this rounded up to a multiple of 8 (beyond 8).
        max_model_len: Longest context a captured step serves; sizes the block
            table buffer and the split-K grid.
        capture: False runs the padded static-buffer step eagerly instead of
            replaying a graph (CPU tests, debugging).

    >>> CudaGraphConfig(max_batch_size=20, max_model_len=4096).batch_sizes
    (1, 2, 4, 8, 16, 24)
    """

    max_batch_size: int
    max_model_len: int
    capture: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.capture, bool):
            raise ConfigError(f"capture must be a bool, got {self.capture!r}")

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return capture_batch_sizes(self.max_batch_size)


def capture_batch_sizes(max_batch_size: int) -> tuple[int, ...]:
    """Bucket sizes: 1, 2, 4, 8, then steps of 8; the last one is >= ``max_batch_size``.

    >>> capture_batch_sizes(3), capture_batch_sizes(17)
    ((1, 2, 4), (1, 2, 4, 8, 16, 24))
    """
    sizes: list[int] = []
    for size in (1, 2, 4, 8):
        sizes.append(size)
        if size >= max_batch_size:
            return tuple(sizes)
    sizes.extend(range(16, 8 * math.ceil(max_batch_size / 8) + 1, 8))
    return tuple(sizes)


def select_bucket(batch_sizes: Sequence[int], num_seqs: int) -> int | None:
    """The smallest bucket that holds ``num_seqs`` rows (None: none does).

    >>> select_bucket((1, 2, 4, 8, 16), 5), select_bucket((1, 2, 4), 5)
    (8, None)
    """
    return next((size for size in batch_sizes if size >= num_seqs), None)


def graph_memory_bytes(
    spec: ModelSpec, config: CudaGraphConfig, dtype: torch.dtype, block_size: int
) -> int:
    """Upper estimate of the memory the graphs hold besides the KV pool.

    Static buffers plus the largest bucket's live tensors (one layer's
    activations, the split-K partials, the logits), doubled for allocator
    rounding. Smaller buckets reuse the largest one's pool.
    """
    rows = config.batch_sizes[-1]
    elem = torch.empty((), dtype=dtype).element_size()
    width = math.ceil(config.max_model_len / block_size)
    static = 8 * (4 * rows + rows * width + rows + 1) + 4 * rows * spec.vocab_size
    per_row = elem * (
        4 * spec.hidden_size + 2 * spec.q_size + 2 * spec.kv_size + 4 * spec.intermediate_size
    )
    partitions = min(_SPLIT_K_PARTITIONS, math.ceil(config.max_model_len / 512))
    split_k = 4 * rows * spec.num_heads * partitions * (spec.head_dim + 2)
    logits = rows * spec.vocab_size * (elem + 4)
    return static + 2 * (rows * per_row + split_k + logits)


def kv_config_after_reserve(
    kv_config: KVCacheConfig, reserve_bytes: int, free_bytes: int, block_bytes: int
) -> KVCacheConfig:
    """The KV config that leaves ``reserve_bytes`` of ``free_bytes`` to the graphs.

    A pool sized by bytes shrinks to fit; a fixed ``num_blocks`` that cannot
    fit raises :class:`ConfigError`.

    >>> kv_config_after_reserve(KVCacheConfig(memory_bytes=100), 30, 110, 10).memory_bytes
    80
    """
    available = free_bytes - reserve_bytes
    if kv_config.num_blocks is not None:
        if kv_config.num_blocks * block_bytes > available:
            raise ConfigError(
                f"{kv_config.num_blocks} KV blocks ({kv_config.num_blocks * block_bytes} bytes) "
                f"and CUDA graphs (~{reserve_bytes} bytes) exceed the free device memory "
                f"({free_bytes} bytes): lower num_kv_blocks or max_num_seqs, or turn "
                "cuda_graphs off"
            )
        return kv_config
    if available < 2 * block_bytes:
        raise ConfigError(
            f"CUDA graphs need ~{reserve_bytes} bytes, which leaves no room for the KV pool "
            f"({free_bytes} bytes free): lower max_num_seqs or turn cuda_graphs off"
        )
    return dataclasses.replace(kv_config, memory_bytes=min(kv_config.memory_bytes, available))


def reserve_graph_memory(
    kv_config: KVCacheConfig,
    spec: ModelSpec,
    config: CudaGraphConfig,
    model_dtype: torch.dtype,
    device: torch.device,
) -> KVCacheConfig:
    """Set the graphs' memory aside before the KV pool is sized (CUDA only)."""
    if not config.capture or device.type != "cuda":
        return kv_config
    free_bytes, _ = torch.cuda.mem_get_info(device)
    reserve = graph_memory_bytes(spec, config, model_dtype, kv_config.block_size)
    block_bytes = bytes_per_block(spec, kv_config.block_size, kv_config.dtype or model_dtype)
    return kv_config_after_reserve(kv_config, reserve, free_bytes, block_bytes)


class CudaGraphRunner:
    """Captured decode steps over static buffers, one graph per bucket.

    The :class:`~streamgen.runner.ModelRunner` asks :meth:`can_run` for every
    batch and, if so, samples from :meth:`run`'s logits; anything else
    (prefill, chunked prefill, trees, batches above the largest bucket) runs
    eagerly.

    Example (on a GPU)::

        graphs = CudaGraphRunner(model, kv_cache, backend, CudaGraphConfig(8, 4096))
        if graphs.can_run(batch):
            logits = graphs.run(batch)  # [len(batch.chunks), vocab] float32
    """

    num_scratch_blocks = 1  # the last KV block; the runner never hands it out

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: PagedKVCache,
        backend: AttentionBackend,
        config: CudaGraphConfig,
    ) -> None:
        self.model = model
        self.spec = model.spec
        self.kv_cache = kv_cache
        self.config = config
        self.device = kv_cache.layers[0][0].device
        if config.capture and self.device.type != "cuda":
            raise ConfigError(
                f"CUDA graphs need a CUDA device, the model is on {self.device}; "
                "use CudaGraphConfig(capture=False) to run the padded step eagerly"
            )
        if kv_cache.num_blocks <= self.num_scratch_blocks:
            raise ConfigError("CUDA graphs need a KV pool of at least 2 blocks (one is scratch)")
        self.backend = backend if backend.supports_cuda_graphs else _graph_safe_backend()
        self.batch_sizes = config.batch_sizes
        self.block_size = kv_cache.block_size
        self.num_blocks = kv_cache.num_blocks - self.num_scratch_blocks  # real blocks
        self.scratch_block = self.num_blocks
        self.max_blocks_per_seq = math.ceil(config.max_model_len / self.block_size)
        self._buffers = _StaticBuffers(self, self.batch_sizes[-1])
        self._metadata = {size: self._bucket_metadata(size) for size in self.batch_sizes}
        self._graphs: dict[int, Any] = self._capture() if config.capture else {}

    @property
    def max_batch_size(self) -> int:
        return self.batch_sizes[-1]

    def can_run(self, batch: ModelBatch) -> bool:
        """True for a non-empty batch of at most ``max_batch_size`` plain decodes
        (one token, no tree, sampled) whose contexts fit ``max_model_len``."""
        chunks = batch.chunks
        return 0 < len(chunks) <= self.max_batch_size and all(
            c.num_tokens == 1
            and c.tree is None
            and c.sampling is not None
            and c.end_pos <= self.config.max_model_len
            for c in chunks
        )

    @torch.inference_mode()
    def run(self, batch: ModelBatch) -> torch.Tensor:  # [num_seqs, vocab] float32
        """Stage the batch, replay its bucket and return the real rows' logits.

        The result is a view of a static buffer, valid until the next call.
        Raises :class:`~streamgen.errors.InvalidPromptError` like the eager path.
        """
        bucket = self._stage(batch.chunks)
        if self._graphs:
            self._graphs[bucket].replay()
        else:
            self._forward(bucket)
        return self._buffers.logits[: len(batch.chunks)]

    def _stage(self, chunks: Sequence[SequenceChunk]) -> int:
        """Validate and flatten the batch into the pinned buffers, pad it to
        its bucket and copy it to the device buffers. Returns the bucket."""
        bucket = select_bucket(self.batch_sizes, len(chunks))
        if bucket is None:
            raise ValueError(f"{len(chunks)} sequences exceed the largest bucket")
        block_size, vocab_size = self.block_size, self.spec.vocab_size
        token_ids, positions, slots, tables = [], [], [], []
        for chunk in chunks:
            check_chunk(chunk, block_size, self.num_blocks, vocab_size)
            pos = chunk.start_pos
            table = chunk.block_table[: pos // block_size + 1]
            token_ids.append(chunk.token_ids[0])
            positions.append(pos)
            slots.append(table[-1] * block_size + pos % block_size)
            tables.append(table)
        self._buffers.stage(token_ids, positions, slots, tables, bucket)
        return bucket

    def _forward(self, bucket: int) -> None:
        """The captured region: static buffers in, ``logits[:bucket]`` out."""
        buffers = self._buffers
        hidden = self.model(
            buffers.input_ids[:bucket],
            buffers.positions[:bucket],
            self.kv_cache.layers,
            self._metadata[bucket],
            self.backend,
        )  # [bucket, hidden]
        buffers.logits[:bucket].copy_(self.model.compute_logits(hidden))

    @torch.inference_mode()
    def _capture(self) -> dict[int, Any]:
        graphs: dict[int, Any] = {}
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):  # largest first: the others fit in its pool
            self._buffers.fill_padding()
            self._forward(size)  # warm-up: compiles the Triton kernels for these shapes
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            graphs[size] = graph
        torch.cuda.synchronize(self.device)
        return graphs

    def _bucket_metadata(self, size: int) -> AttentionMetadata:
        buffers = self._buffers
        return AttentionMetadata(
            slot_mapping=buffers.slot_mapping[:size],
            query_start_loc=buffers.query_start_loc[: size + 1],
            seq_lens=buffers.seq_lens[:size],
            block_tables=buffers.block_tables[:size],
            query_lens_list=(1,) * size,
            # An upper bound, not the real lengths: the grid is planned for the longest context.
            seq_lens_list=(self.config.max_model_len,) * size,
            block_size=self.block_size,
            sliding_window=self.spec.sliding_window,
        )


class _StaticBuffers:
    """The captured step's inputs and output on the device, and their pinned
    host staging copies.

    ``vectors [4, rows]`` packs input_ids, positions, slot_mapping and seq_lens
    so that one copy moves them; block tables are copied only as wide as the
    step's longest table (the kernels never read past a row's ``seq_len``).
    """

    def __init__(self, graphs: CudaGraphRunner, rows: int) -> None:
        device = graphs.device
        pin = device.type == "cuda"
        width = graphs.max_blocks_per_seq
        self.rows = rows
        self.scratch_block = graphs.scratch_block
        self.padding = (_PADDING_TOKEN, 0, graphs.scratch_block * graphs.block_size, 1)
        self.host_vectors = torch.empty(4, rows, dtype=torch.int64, pin_memory=pin)  # [4, rows]
        self.host_tables = torch.empty(rows * width, dtype=torch.int64, pin_memory=pin)
        self.vectors = torch.empty(4, rows, dtype=torch.int64, device=device)  # [4, rows]
        self.input_ids = self.vectors[0]  # [rows]
        self.positions = self.vectors[1]  # [rows]
        self.slot_mapping = self.vectors[2]  # [rows]
        self.seq_lens = self.vectors[3]  # [rows]
        self.block_tables = torch.empty(rows, width, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(rows + 1, dtype=torch.int64, device=device)
        self.logits = torch.empty(
            rows, graphs.spec.vocab_size, dtype=torch.float32, device=device
        )  # [rows, vocab]
        # Recorded after each host-to-device copy: the pinned buffers are not
        # rewritten before the previous step's copy has read them.
        self._copied: Any = torch.cuda.Event() if pin else None
        self.fill_padding()

    def fill_padding(self) -> None:
        """Every row a padding row (before capture)."""
        self.stage([], [], [], [], self.rows)

    def stage(
        self,
        token_ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[Sequence[int]],
        bucket: int,
    ) -> None:
        if self._copied is not None:
            self._copied.synchronize()
        num_seqs = len(token_ids)
        vectors = self.host_vectors.numpy()  # [4, rows], shares the pinned memory
        for row, values in enumerate((token_ids, positions, slots)):
            vectors[row, :num_seqs] = values
        vectors[3, :num_seqs] = [pos + 1 for pos in positions]
        for row, value in enumerate(self.padding):
            vectors[row, num_seqs:bucket] = value
        width = max((len(t) for t in tables), default=1)
        staged = self.host_tables[: bucket * width].view(bucket, width)  # [bucket, width]
        staged_np = staged.numpy()
        for row, table in enumerate(tables):
            staged_np[row, : len(table)] = table
        staged_np[num_seqs:bucket, 0] = self.scratch_block
        self.vectors.copy_(self.host_vectors, non_blocking=True)
        self.block_tables[:bucket, :width].copy_(staged, non_blocking=True)
        if self._copied is not None:
            self._copied.record()


def _graph_safe_backend() -> AttentionBackend:
    from streamgen.attention.registry import create_backend

    try:
        return create_backend("triton")
    except BackendUnavailableError as error:
        raise BackendUnavailableError(
            f"CUDA graphs capture the Triton decode kernels: {error}; set cuda_graphs=False"
        ) from error

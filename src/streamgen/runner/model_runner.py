"""The model runner: plain batch in, sampled tokens out.

The only place (with ``model/`` and ``attention/``) where tensors live. It
owns the paged KV memory, the attention backend and the sampler; it does not
decide anything about scheduling or block ownership.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch

from streamgen.attention.backend import AttentionBackend
from streamgen.attention.registry import create_backend
from streamgen.checkpoint.loader import LoadedModel
from streamgen.runner.batch import ModelBatch, RunnerOutput, SequenceChunk
from streamgen.runner.cuda_graph import CudaGraphConfig, CudaGraphRunner, reserve_graph_memory
from streamgen.runner.input_prep import StepInputs, prepare_inputs
from streamgen.runner.kv_cache import KVCacheConfig, PagedKVCache, copy_blocks, default_kv_dtype
from streamgen.runner.sampler import Sampler
from streamgen.spec.verify import accepted_kv_moves, move_kv, verify_trees


class ModelRunner:
    """Runs steps of a :class:`~streamgen.model.LoadedModel` over a paged KV cache.

    >>> runner = ModelRunner(load_model(), KVCacheConfig(num_blocks=64))  # doctest: +SKIP
    >>> out = runner.execute(ModelBatch([SequenceChunk("a", [1, 2, 3], 0, [0], sampling)]))
    """

    def __init__(
        self,
        loaded: LoadedModel,
        kv_config: KVCacheConfig | None = None,
        *,
        backend: AttentionBackend | str = "torch",
        sampler: Sampler | None = None,
        num_host_blocks: int = 0,
        cuda_graphs: CudaGraphConfig | None = None,
    ) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.device = loaded.device
        kv_config = kv_config or KVCacheConfig()
        if cuda_graphs is not None:  # CUDA graphs: their memory is set aside before the KV pool
            kv_config = reserve_graph_memory(
                kv_config, loaded.spec, cuda_graphs, loaded.dtype, self.device
            )
        if kv_config.dtype is None:
            dtype = default_kv_dtype(loaded.dtype, loaded.quantized)
            kv_config = dataclasses.replace(kv_config, dtype=dtype)
        self.kv_cache = PagedKVCache(loaded.spec, kv_config, loaded.dtype, self.device)
        # Host-memory pool for swap preemption (same layout as the device cache).
        host_config = KVCacheConfig(
            block_size=self.kv_cache.block_size,
            num_blocks=max(1, num_host_blocks),
            dtype=self.kv_cache.dtype,
        )
        self.host_kv_cache = PagedKVCache(loaded.spec, host_config, loaded.dtype, "cpu")
        self.backend = create_backend(backend) if isinstance(backend, str) else backend
        self.sampler = sampler or Sampler(eos_token_ids=loaded.spec.eos_token_ids)
        # Seconds in the model's forward and LM head (the kernels), summed over execute().
        self.kernel_seconds = 0.0
        # CUDA graphs (runner/cuda_graph.py): captured decode steps, consulted by execute().
        self.graphs = (
            CudaGraphRunner(loaded.model, self.kv_cache, self.backend, cuda_graphs)
            if cuda_graphs is not None
            else None
        )

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    @property
    def num_blocks(self) -> int:
        """KV blocks the block manager may hand out (CUDA graphs keep one as scratch)."""
        scratch = 0 if self.graphs is None else self.graphs.num_scratch_blocks
        return self.kv_cache.num_blocks - scratch

    def apply_block_ops(
        self,
        swap_out: list[tuple[int, int]],
        swap_in: list[tuple[int, int]],
        copies: list[tuple[int, int]],
    ) -> None:
        """Perform the scheduler's block moves, in the order it requires:
        swap-outs (device -> host), swap-ins (host -> device), then copies."""
        copy_blocks(self.kv_cache, self.host_kv_cache, swap_out)
        copy_blocks(self.host_kv_cache, self.kv_cache, swap_in)
        copy_blocks(self.kv_cache, self.kv_cache, copies)

    def prepare(self, batch: ModelBatch) -> StepInputs:
        return prepare_inputs(
            batch,
            self.block_size,
            self.num_blocks,
            self.spec.vocab_size,
            self.device,
            self.spec.sliding_window,
        )

    def forward_hidden(self, inputs: StepInputs) -> torch.Tensor:  # [num_tokens, hidden]
        return self.loaded.model(
            inputs.input_ids,
            inputs.positions,
            self.kv_cache.layers,
            inputs.metadata,
            self.backend,
        )

    def forward_logits(self, batch: ModelBatch) -> torch.Tensor:
        """Logits at every new token, ``[num_tokens, vocab]`` float32 (for tests and scoring)."""
        hidden = self.forward_hidden(self.prepare(batch))
        return self.loaded.model.compute_logits(hidden)

    def execute(
        self, batch: ModelBatch, masked: Callable[[], ModelBatch] | None = None
    ) -> RunnerOutput:
        """Run one step: sample the next token of every chunk that asks for it,
        and verify every draft tree (moving accepted drafts' K/V into place).

        ``masked``: the same batch with the structured-output masks filled in, waited for
        only after the forward (it is computed meanwhile on another thread)."""
        # CUDA graphs: all-decode batches that fit a captured bucket replay it.
        if self.graphs is not None and self.graphs.can_run(batch):
            logits = self.graphs.run(batch)
            return self._sample(logits, list((masked() if masked else batch).chunks))
        inputs = self.prepare(batch)
        if not batch.chunks:
            return RunnerOutput()
        started = time.perf_counter()
        hidden = self.forward_hidden(inputs)
        prompt_logprobs = self._prompt_logprobs(hidden, batch)
        if not inputs.sample_chunk_indices:
            self.kernel_seconds += time.perf_counter() - started
            return RunnerOutput(prompt_logprobs=prompt_logprobs)
        logits = self.loaded.model.compute_logits(hidden[inputs.sample_rows])  # [rows, vocab]
        self.kernel_seconds += time.perf_counter() - started
        if masked is not None:
            batch = masked()
        chunks = [batch.chunks[i] for i in inputs.sample_chunk_indices]
        if all(c.tree is None for c in chunks):
            output = self._sample(logits, chunks)
        else:
            output = self._sample_and_verify(logits, chunks, inputs.sample_row_counts)
        return (
            dataclasses.replace(output, prompt_logprobs=prompt_logprobs)
            if prompt_logprobs
            else output
        )

    def _prompt_logprobs(
        self,
        hidden: torch.Tensor,
        batch: ModelBatch,  # hidden [num_tokens, hidden]
    ) -> dict[str, list[tuple[int, float, tuple[tuple[int, float], ...]]]]:
        """Each prompt-logprob chunk's rows: the log-softmax of the model's logits (float32)
        at the prompt token each row predicts, and the top-k of the row."""
        out: dict[str, list[tuple[int, float, tuple[tuple[int, float], ...]]]] = {}
        offset = 0
        for chunk in batch.chunks:
            if chunk.prompt_logprobs is not None and chunk.prompt_targets:
                n = len(chunk.prompt_targets)
                logits = self.loaded.model.compute_logits(hidden[offset : offset + n])
                logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
                targets = torch.tensor(list(chunk.prompt_targets), device=logprobs.device)
                chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
                k = chunk.prompt_logprobs
                tops: list[tuple[tuple[int, float], ...]] = [()] * n
                if k > 0:
                    values, ids = logprobs.topk(k, dim=-1)
                    tops = [
                        tuple(zip(i, v, strict=True))
                        for i, v in zip(ids.tolist(), values.tolist(), strict=True)
                    ]
                out[chunk.request_id] = [
                    (chunk.start_pos + 1 + r, chosen[r], tops[r]) for r in range(n)
                ]
            offset += chunk.num_tokens
        return out

    def _sample(self, logits: torch.Tensor, chunks: list[SequenceChunk]) -> RunnerOutput:
        requests = [c.sampling for c in chunks if c.sampling is not None]
        result = self.sampler.sample(logits, requests)
        return RunnerOutput(
            request_ids=[c.request_id for c in chunks],
            token_ids=result.token_ids,
            logprobs=result.logprobs,
            top_logprobs=result.top_logprobs,
        )

    def _sample_and_verify(
        self,
        logits: torch.Tensor,  # [rows, vocab]
        chunks: list[SequenceChunk],
        row_counts: tuple[int, ...],
    ) -> RunnerOutput:
        starts = [0]
        for count in row_counts:
            starts.append(starts[-1] + count)
        plain = [i for i, c in enumerate(chunks) if c.tree is None]
        trees = [i for i, c in enumerate(chunks) if c.tree is not None]
        tree_rows = [r for i in trees for r in range(starts[i], starts[i + 1])]
        device = logits.device
        verified = verify_trees(
            logits.index_select(0, torch.tensor(tree_rows, device=device)),
            [chunks[i] for i in trees],
            self.sampler,
        )
        src, dst = accepted_kv_moves([chunks[i] for i in trees], verified, self.block_size)
        move_kv(self.kv_cache.layers, src, dst)
        sampled = (
            self._sample(
                logits.index_select(0, torch.tensor([starts[i] for i in plain], device=device)),
                [chunks[i] for i in plain],
            )
            if plain
            else RunnerOutput()
        )
        # Reassemble in batch order, one entry per emitted token.
        by_chunk: dict[int, list[tuple[int, float, list[tuple[int, float]]]]] = {}
        for j, i in enumerate(plain):
            top = sampled.top_logprobs[j] if sampled.top_logprobs is not None else []
            by_chunk[i] = [(sampled.token_ids[j], sampled.logprobs[j], top)]
        for i, result in zip(trees, verified, strict=True):
            by_chunk[i] = list(
                zip(result.acceptance.token_ids, result.logprobs, result.top_logprobs, strict=True)
            )
        output = RunnerOutput(top_logprobs=[])
        for i, chunk in enumerate(chunks):
            for token, logprob, top in by_chunk[i]:
                output.request_ids.append(chunk.request_id)
                output.token_ids.append(token)
                output.logprobs.append(logprob)
                assert output.top_logprobs is not None
                output.top_logprobs.append(top)
        return output

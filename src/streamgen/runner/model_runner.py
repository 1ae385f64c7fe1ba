"""The model runner: plain batch in, sampled tokens out.

The only place (with ``model/`` and ``attention/``) where tensors live. It
owns the paged KV memory, the attention backend and the sampler; it does not
decide anything about scheduling or block ownership.
"""

from __future__ import annotations

import torch

from streamgen.attention.backend import AttentionBackend
from streamgen.attention.registry import create_backend
from streamgen.model.loader import LoadedModel
from streamgen.runner.batch import ModelBatch, RunnerOutput
from streamgen.runner.input_prep import StepInputs, prepare_inputs
from streamgen.runner.kv_cache import KVCacheConfig, PagedKVCache, copy_blocks
from streamgen.runner.sampler import Sampler


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
    ) -> None:
        self.loaded = loaded
        self.spec = loaded.spec
        self.device = loaded.device
        self.kv_cache = PagedKVCache(
            loaded.spec, kv_config or KVCacheConfig(), loaded.dtype, self.device
        )
        # Host-memory pool for swap preemption (same layout as the device cache).
        host_config = KVCacheConfig(
            block_size=self.kv_cache.block_size,
            num_blocks=max(1, num_host_blocks),
            dtype=self.kv_cache.dtype,
        )
        self.host_kv_cache = PagedKVCache(loaded.spec, host_config, loaded.dtype, "cpu")
        self.backend = create_backend(backend) if isinstance(backend, str) else backend
        self.sampler = sampler or Sampler(eos_token_ids=loaded.spec.eos_token_ids)

    @property
    def block_size(self) -> int:
        return self.kv_cache.block_size

    @property
    def num_blocks(self) -> int:
        return self.kv_cache.num_blocks

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

    def execute(self, batch: ModelBatch) -> RunnerOutput:
        """Run one step and sample the next token of every chunk that asks for it."""
        inputs = self.prepare(batch)
        if not batch.chunks:
            return RunnerOutput()
        hidden = self.forward_hidden(inputs)
        if not inputs.sample_chunk_indices:
            return RunnerOutput()
        logits = self.loaded.model.compute_logits(hidden[inputs.sample_rows])
        chunks = [batch.chunks[i] for i in inputs.sample_chunk_indices]
        requests = [c.sampling for c in chunks if c.sampling is not None]
        result = self.sampler.sample(logits, requests)
        return RunnerOutput(
            request_ids=[c.request_id for c in chunks],
            token_ids=result.token_ids,
            logprobs=result.logprobs,
            top_logprobs=result.top_logprobs,
        )

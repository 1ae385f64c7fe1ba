"""Synchronous batched generation, without the async engine.

Every request runs in every step (whole-prompt prefill, then one decode
token per step) over the paged KV cache. It is the simplest correct driver
of :class:`~streamgen.runner.ModelRunner`: used by the demo, benchmarks and
tests that compare against HF transformers. Applications want
``streamgen.Engine`` (continuous batching, streaming, cancellation).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from streamgen.errors import CapacityError, ConfigError, InvalidPromptError
from streamgen.kv.block_pool import BlockPool
from streamgen.model.loader import LoadedModel
from streamgen.runner.batch import ModelBatch, SequenceChunk
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner
from streamgen.runner.sampler import SamplingRequest
from streamgen.sampling_params import SamplingParams


@dataclass(slots=True)
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_cached: int = 0
    finished: bool = False


class OfflineGenerator:
    """Generate token ids for a list of prompts, all batched together.

    >>> gen = OfflineGenerator(load_model())  # doctest: +SKIP
    >>> gen.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8))
    [[...8 token ids...]]
    """

    def __init__(
        self,
        loaded: LoadedModel,
        kv_config: KVCacheConfig | None = None,
        *,
        backend: str = "torch",
    ) -> None:
        self.runner = ModelRunner(loaded, kv_config, backend=backend)
        self.pool = BlockPool(self.runner.num_blocks)
        self.eos_token_ids = set(loaded.spec.eos_token_ids)
        self.max_context = loaded.spec.max_position_embeddings

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> list[list[int]]:
        """Generated token ids per prompt (stopping at EOS / stop ids / max_tokens)."""
        seqs = self._make_sequences(prompts, params)
        for _ in self._steps(seqs):
            pass
        return [s.output_ids for s in seqs]

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Yield one prompt's tokens as they are generated."""
        (seq,) = self._make_sequences([prompt], params)
        for _ in self._steps([seq]):
            yield seq.output_ids[-1]

    def _make_sequences(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> list[_Sequence]:
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        if len(per_prompt) != len(prompts):
            raise ConfigError("give one SamplingParams, or one per prompt")
        seqs = []
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt, strict=True)):
            if not prompt:
                raise InvalidPromptError(f"prompt {i} is empty")
            if p.stop:
                raise ConfigError("stop strings need streamgen.Engine (text is not decoded here)")
            seqs.append(_Sequence(f"req-{i}", list(prompt), p))
        return seqs

    def _steps(self, seqs: list[_Sequence]) -> Iterator[None]:
        try:
            while True:
                active = [s for s in seqs if not s.finished]
                if not active:
                    return
                chunks = [self._schedule(s) for s in active]
                output = self.runner.execute(ModelBatch(chunks))
                for seq, chunk, token in zip(active, chunks, output.token_ids, strict=True):
                    seq.num_cached += chunk.num_tokens
                    seq.output_ids.append(token)
                    seq.finished = self._is_finished(seq, token)
                yield
        finally:
            for s in seqs:
                self.pool.free(s.block_table)
                s.block_table = []

    def _schedule(self, seq: _Sequence) -> SequenceChunk:
        tokens = seq.prompt_ids + seq.output_ids
        new_tokens = tokens[seq.num_cached :]
        needed = -(-len(tokens) // self.runner.block_size) - len(seq.block_table)
        if needed > 0:
            if not self.pool.can_allocate(needed):
                raise CapacityError("KV cache too small for this offline batch")
            seq.block_table.extend(self.pool.allocate(needed))
        sampling = SamplingRequest(seq.params, seq.prompt_ids, tuple(seq.output_ids))
        return SequenceChunk(seq.request_id, new_tokens, seq.num_cached, seq.block_table, sampling)

    def _is_finished(self, seq: _Sequence, token: int) -> bool:
        p = seq.params
        if p.max_tokens is not None and len(seq.output_ids) >= p.max_tokens:
            return True
        if len(seq.prompt_ids) + len(seq.output_ids) >= self.max_context:
            return True
        if len(seq.output_ids) < p.min_tokens:
            return False
        if token in p.stop_token_ids:
            return True
        return not p.ignore_eos and token in self.eos_token_ids

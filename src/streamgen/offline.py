"""Synchronous batched generation, without the async engine.

The engine's own :class:`~streamgen.scheduler.Scheduler` and
:class:`~streamgen.kv.BlockManager` drive a :class:`~streamgen.runner.ModelRunner`
on the caller's thread: continuous batching, chunked prefill and recompute
preemption when the KV pool runs short, the same stop rules as the engine. No
event loop, no text (token ids in, token ids out). Used by the demo,
benchmarks and tests that compare against HF transformers; applications want
``streamgen.Engine`` (streaming, backpressure, cancellation, priorities).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from streamgen.checkpoint.loader import LoadedModel
from streamgen.errors import CapacityError, ConfigError
from streamgen.kv.block_manager import BlockManager
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.runner.model_runner import ModelRunner
from streamgen.sampling_params import SamplingParams
from streamgen.scheduler import Request, Scheduler, SchedulerConfig


class OfflineGenerator:
    """Generate token ids for a list of prompts, all batched together.

    ``max_num_batched_tokens`` and ``max_num_seqs`` bound one step as in
    :class:`~streamgen.EngineConfig` (the defaults prefill typical prompt sets in
    one step).

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
        max_num_batched_tokens: int = 16384,
        max_num_seqs: int = 256,
    ) -> None:
        self.runner = ModelRunner(loaded, kv_config, backend=backend)
        self.config = SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            block_size=self.runner.block_size,
        )
        # Shared by every call; each call's requests free their blocks when it ends.
        self.blocks = BlockManager(
            self.runner.num_blocks, self.runner.block_size, enable_prefix_caching=False
        )
        self.eos_token_ids = tuple(loaded.spec.eos_token_ids)
        self.max_model_len = loaded.spec.max_position_embeddings

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> list[list[int]]:
        """Generated token ids per prompt (stopping at EOS / stop ids / max_tokens).

        Raises:
            InvalidPromptError: a prompt is empty or longer than the model's context.
            CapacityError: a prompt needs more KV blocks than the whole pool.
            ConfigError: the params ask for stop strings or structured outputs (no text
                here), or their count differs from the prompts'.
        """
        requests = self._make_requests(prompts, params)
        outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
        for request_id, token_ids in self._run(requests):
            outputs[request_id].extend(token_ids)
        return [outputs[r.request_id] for r in requests]

    def stream(self, prompt: Sequence[int], params: SamplingParams) -> Iterator[int]:
        """Yield one prompt's tokens as they are generated (closing it early frees
        the request's blocks)."""
        for _, token_ids in self._run(self._make_requests([prompt], params)):
            yield from token_ids

    def _make_requests(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams],
    ) -> list[Request]:
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else params
        if len(per_prompt) != len(prompts):
            raise ConfigError("give one SamplingParams, or one per prompt")
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, per_prompt, strict=True)):
            if p.stop:
                raise ConfigError("stop strings need streamgen.Engine (text is not decoded here)")
            if p.structured_outputs is not None:
                raise ConfigError("structured outputs need streamgen.Engine (no tokenizer here)")
            request = Request(f"req-{i}", list(prompt), p)
            request.check_prompt(self.max_model_len, self.blocks.num_total_blocks,
                                 self.runner.block_size)
            requests.append(request)
        return requests

    def _run(self, requests: list[Request]) -> Iterator[tuple[str, list[int]]]:
        """(request id, new tokens) per request and step until every request ends."""
        scheduler = Scheduler(
            self.config, self.blocks,
            max_model_len=self.max_model_len, eos_token_ids=self.eos_token_ids,
        )
        try:
            for request in requests:
                scheduler.add_request(request)
            while scheduler.has_unfinished():
                output = scheduler.schedule()
                if output.is_empty:  # only backpressure stalls a step, and nothing pushes back here
                    raise CapacityError("no request could be scheduled")
                self.runner.apply_block_ops(
                    output.blocks_to_swap_out, output.blocks_to_swap_in, output.blocks_to_copy
                )
                result = self.runner.execute(output.batch)
                for request_id, token_ids, _finish in scheduler.update(result):
                    yield request_id, token_ids
        finally:
            for request in requests:  # an early exit (error, closed stream) frees blocks
                scheduler.abort_request(request.request_id)

"""HF transformers continuous batching (`continuous_batching_context_manager`), if present.

Each session opens a fresh manager (paged cache of ``kv_cache_bytes``, the
same token budget per step as streamgen's engine). Requests are added at
their arrival times with their own ``max_new_tokens`` and ``eos_token_id=-1``
(EOS ignored). Token times are the manager's per-token timestamps, taken when
each token is generated.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from bench.systems.base import (
    Progress,
    Trace,
    Unavailable,
    in_arrival_order,
    refuse_slow_readers,
    sleep_until,
)
from bench.systems.hf_generate import load_hf_model
from bench.workloads import Request, SystemOptions

PAGE_SIZE = 256  # transformers' default page size for continuous batching


def has_continuous_batching() -> bool:
    from transformers import GenerationMixin

    return hasattr(GenerationMixin, "continuous_batching_context_manager")


class HFContinuousSystem:
    """The HF model, loaded once per worker; one manager per session."""

    def __init__(self, model: str | None, dtype: str, threads: int) -> None:
        if not has_continuous_batching():
            raise Unavailable("this transformers has no continuous batching")
        self.model = load_hf_model(model, dtype)

    def session(self, options: SystemOptions) -> HFContinuousSession:
        if options.speculation:
            raise Unavailable("not available: HF continuous batching has no speculation")
        return HFContinuousSession(self.model, options)


def _num_blocks(model: Any, kv_cache_bytes: int) -> int:
    """Blocks of PAGE_SIZE tokens (every layer's K and V) that fit in ``kv_cache_bytes``."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = (
        2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * model.dtype.itemsize
    )
    return max(1, kv_cache_bytes // (PAGE_SIZE * per_token))


class HFContinuousSession:
    """A started continuous-batching manager with a fresh paged cache."""

    def __init__(self, model: Any, options: SystemOptions) -> None:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        cb_config = ContinuousBatchingConfig(
            page_size=PAGE_SIZE,
            num_blocks=_num_blocks(model, options.kv_cache_bytes),
            max_batch_tokens=options.max_num_batched_tokens,
            allow_block_sharing=options.prefix_caching is not False,
        )
        self._context = model.continuous_batching_context_manager(
            generation_config=GenerationConfig(do_sample=False, eos_token_id=-1),
            continuous_batching_config=cb_config,
            block=True,
            timeout=30,
        )
        self.manager = self._context.__enter__()

    def run(self, requests: Sequence[Request], progress: Progress) -> list[Trace]:
        refuse_slow_readers(requests, "HF continuous batching (as driven here)")
        start = time.perf_counter()
        ids: dict[str, int] = {}
        for i in in_arrival_order(requests):
            sleep_until(start, requests[i].arrival_s)
            rid = self.manager.add_request(
                list(requests[i].prompt),
                max_new_tokens=requests[i].output_len,
                eos_token_id=-1,
                record_timestamps=True,
            )
            ids[rid] = i
        traces: dict[int, Trace] = {}
        while len(traces) < len(requests):
            result = self.manager.get_result(timeout=1)
            if result is None:
                if not self.manager.is_running():
                    raise RuntimeError("HF continuous batching stopped unexpectedly")
                continue
            if not result.is_finished() or result.request_id not in ids:
                continue
            if result.error is not None:
                raise RuntimeError(f"HF continuous batching failed: {result.error}")
            i = ids[result.request_id]
            trace = traces[i] = Trace(result.created_time - start, requests[i].tag)
            for when, token in zip(result.timestamps or [], result.generated_tokens, strict=True):
                trace.add(when - start, token)
            progress(len(result.generated_tokens))
        return [traces[i] for i in range(len(requests))]

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self._context.__exit__(None, None, None)

"""HF transformers `generate` in static batches: the plain-PyTorch peer.

Requests that have arrived are taken in arrival order, up to ``hf_batch_size``
at a time, left-padded, and the batch runs to its longest requested output
(``min_new_tokens`` = ``max_new_tokens``, so EOS never ends it early); only
the requested tokens count. Token times are taken when each step's token is
computed (a stopping criterion that never stops), though `generate` hands
tokens to the caller only when the batch ends: a generous reading of its
latency. With ``speculation``, each request runs alone with HF's prompt-lookup
decoding (``prompt_lookup_num_tokens``), which needs batch size 1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from bench.systems.base import (
    Progress,
    Trace,
    Unavailable,
    in_arrival_order,
    refuse_slow_readers,
    sleep_until,
)
from bench.workloads import Request, SystemOptions


def load_hf_model(model: str | None, dtype: str) -> Any:
    from transformers import AutoModelForCausalLM

    from streamgen.checkpoint import default_model_path
    from streamgen.checkpoint.loader import resolve_dtype

    path = model or str(default_model_path(progress=False))
    return AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype)).eval()


class StepClock:
    """A stopping criterion that never stops: records (time, tokens so far) per step."""

    def __init__(self, prompt_width: int) -> None:
        self.prompt_width = prompt_width
        self.steps: list[tuple[float, int]] = []

    def __call__(self, input_ids: torch.Tensor, scores: Any, **_: Any) -> torch.Tensor:
        self.steps.append((time.perf_counter(), input_ids.shape[1] - self.prompt_width))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def token_times(self, num_tokens: int) -> list[float]:
        """When each of the first ``num_tokens`` tokens was computed."""
        times: list[float] = []
        for when, count in self.steps:
            times += [when] * (min(count, num_tokens) - len(times))
        return times


class HFGenerateSystem:
    """The HF model, loaded once per worker; sessions are stateless."""

    def __init__(self, model: str | None, dtype: str, threads: int) -> None:
        self.model = load_hf_model(model, dtype)

    def session(self, options: SystemOptions) -> HFGenerateSession:
        if options.prefix_caching:
            raise Unavailable("not available: static `generate` has no prefix cache")
        return HFGenerateSession(self.model, options)


class HFGenerateSession:
    """Static batches of the requests that have arrived, in arrival order."""

    def __init__(self, model: Any, options: SystemOptions) -> None:
        self.model = model
        self.options = options
        self.batch_size = 1 if options.speculation else options.hf_batch_size

    def run(self, requests: Sequence[Request], progress: Progress) -> list[Trace]:
        refuse_slow_readers(requests, "static `generate`")
        from transformers import StoppingCriteriaList

        start = time.perf_counter()
        pending = in_arrival_order(requests)
        traces: dict[int, Trace] = {}
        pad = self.model.generation_config.pad_token_id or 0
        extra: dict[str, Any] = {}
        if self.options.speculation:
            extra["prompt_lookup_num_tokens"] = self.options.speculative_tokens
        while pending:
            sleep_until(start, requests[pending[0]].arrival_s)
            now = time.perf_counter() - start
            batch = [i for i in pending if requests[i].arrival_s <= now][: self.batch_size]
            pending = [i for i in pending if i not in batch]
            prompts = [list(requests[i].prompt) for i in batch]
            width = max(len(p) for p in prompts)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
            new = max(requests[i].output_len for i in batch)
            clock = StepClock(width)
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    min_new_tokens=new,
                    do_sample=False,
                    pad_token_id=pad,
                    stopping_criteria=StoppingCriteriaList([clock]),
                    **extra,
                )
            for row, i in enumerate(batch):
                n = requests[i].output_len
                trace = traces[i] = Trace(requests[i].arrival_s, requests[i].tag)
                for when, token in zip(
                    clock.token_times(n), out[row, width : width + n].tolist(), strict=True
                ):
                    trace.add(when - start, token)
                progress(n)
        return [traces[i] for i in range(len(requests))]

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

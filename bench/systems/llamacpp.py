"""llama.cpp through `llama-cpp-python` (optional: the `bench` extra): a reference peer.

Caveat: it runs the Q4_1 GGUF the default model is converted from (4-bit
weights, 8-bit activations in its dot products), not the float weights the
other systems use, so it reads 3-6x fewer weight bytes per step; its numbers
are a reference, not equal work. One `Llama` holds one sequence: requests
run one at a time in arrival order. Greedy (``temp=0``), EOS ignored (the
generator is read for exactly ``output_len`` tokens). Prefix caching: llama-cpp
reuses the KV of the longest prefix shared with the previous request; "off"
resets the context before each request. Speculation: its prompt-lookup draft
model (``LlamaPromptLookupDecoding``).
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
from bench.workloads import Request, SystemOptions

N_CTX = 4096


class LlamaCppSystem:
    """The GGUF loaded by llama-cpp-python (one `Llama` per speculation setting)."""

    def __init__(self, gguf: str | None, threads: int) -> None:
        if gguf is None:
            raise Unavailable("no GGUF for this model (pass --gguf)")
        try:
            import llama_cpp  # noqa: F401
        except ImportError as err:
            raise Unavailable(f"llama-cpp-python is not installed ({err})") from err
        self.gguf = gguf
        self.threads = threads
        self._models: dict[tuple[str | None, int], Any] = {}

    def _model(self, options: SystemOptions) -> Any:
        """One `Llama` per speculation setting (the draft model is a constructor argument)."""
        key = (options.speculation, options.speculative_tokens)
        if key not in self._models:
            from llama_cpp import Llama

            draft = None
            if options.speculation:
                from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

                draft = LlamaPromptLookupDecoding(num_pred_tokens=options.speculative_tokens)
            self._models[key] = Llama(
                model_path=self.gguf,
                n_ctx=N_CTX,
                n_batch=512,
                n_threads=self.threads,
                n_threads_batch=self.threads,
                flash_attn=True,
                draft_model=draft,
                seed=0,
                verbose=False,
            )
        return self._models[key]

    def session(self, options: SystemOptions) -> LlamaCppSession:
        return LlamaCppSession(self._model(options), options)


class LlamaCppSession:
    """One `Llama` context, reset at the start: requests one at a time."""

    def __init__(self, llm: Any, options: SystemOptions) -> None:
        self.llm = llm
        self.options = options
        llm.reset()

    def run(self, requests: Sequence[Request], progress: Progress) -> list[Trace]:
        refuse_slow_readers(requests, "llama-cpp-python")
        start = time.perf_counter()
        traces: dict[int, Trace] = {}
        for i in in_arrival_order(requests):
            request = requests[i]
            sleep_until(start, request.arrival_s)
            if self.options.prefix_caching is False:
                self.llm.reset()
            trace = traces[i] = Trace(request.arrival_s, request.tag)
            tokens = self.llm.generate(
                list(request.prompt),
                top_k=1,
                top_p=1.0,
                min_p=0.0,
                temp=0.0,
                repeat_penalty=1.0,
            )
            for token in tokens:
                trace.add(time.perf_counter() - start, token)
                progress(1)
                if len(trace.token_ids) == request.output_len:
                    break
            tokens.close()
        return [traces[i] for i in range(len(requests))]

    def info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        pass

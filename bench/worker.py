"""One system under test in its own process: `python -m bench.worker SYSTEM --dtype D`.

Each system gets a clean process (its own allocator, caches and thread
pool), so that one system's state cannot slow the other. The parent sends
one JSON request a line on stdin and reads one JSON result a line:

    -> {"prompt_ids": [...], "new_tokens": 128}
    <- {"tok_s": 19.2, "ttft_s": 0.27, "token_ids": [...]}

The first line written is {"ready": true} once the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch


class StreamgenSystem:
    def __init__(self, model: str | None, dtype: str) -> None:
        from streamgen import OfflineGenerator, load_model

        self.generator = OfflineGenerator(load_model(model, dtype=dtype, load_tokenizer=False))

    def run(self, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
        from streamgen import SamplingParams

        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
        token_ids: list[int] = []
        start = time.perf_counter()
        ttft = 0.0
        for token_id in self.generator.stream(prompt_ids, params):
            if not token_ids:
                ttft = time.perf_counter() - start
            token_ids.append(token_id)
        total = time.perf_counter() - start
        return {"tok_s": len(token_ids) / total, "ttft_s": ttft, "token_ids": token_ids}


    def run_workload(
        self, prompts: list[list[int]], output_lens: list[int], **config: Any
    ) -> dict[str, Any]:
        """All requests submitted at once to the async engine."""
        import asyncio

        from streamgen import Engine, EngineConfig, SamplingParams

        async def main() -> dict[str, Any]:
            engine_config = EngineConfig(**config)
            async with Engine(self.generator.runner.loaded, engine_config) as engine:
                streams = [
                    engine.stream(p, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
                    for p, n in zip(prompts, output_lens, strict=True)
                ]
                start = time.perf_counter()
                counts = await asyncio.gather(*(_drain(s) for s in streams))
                total = time.perf_counter() - start
                stats = engine.stats()
            ttfts = [s.metrics.ttft for s in streams if s.metrics.ttft is not None]
            itls = [x for s in streams for x in s.metrics.inter_token_latencies]
            return {
                "useful_tok_s": sum(counts) / total,
                "total_s": total,
                "ttft_s": _percentiles(ttfts),
                "itl_s": _percentiles(itls),
                "preemptions": stats["preemptions"],
            }

        return asyncio.run(main())


async def _drain(stream: Any) -> int:
    count = 0
    async for _ in stream:
        count += 1
    return count


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.50), "p99": pick(0.99)}


class HFGenerateSystem:
    def __init__(self, model: str | None, dtype: str) -> None:
        from transformers import AutoModelForCausalLM

        from streamgen.model.loader import resolve_dtype
        from streamgen.models import default_model_path

        path = model or str(default_model_path(progress=False))
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype)).eval()

    def run(self, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
        ids = torch.tensor([prompt_ids])
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
            )
        total = time.perf_counter() - start
        token_ids = out[0, len(prompt_ids) :].tolist()
        return {"tok_s": len(token_ids) / total, "ttft_s": None, "token_ids": token_ids}


    def run_workload(
        self, prompts: list[list[int]], output_lens: list[int], batch_size: int = 8, **_: Any
    ) -> dict[str, Any]:
        """Static batches in arrival order, left-padded; each batch runs to its longest
        requested output; only the requested tokens count as useful."""
        pad = self.model.generation_config.pad_token_id or 0
        start = time.perf_counter()
        ttfts: list[float] = []
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            lens = output_lens[first : first + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.inference_mode():
                self.model.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max(lens),
                    min_new_tokens=max(lens), do_sample=False, pad_token_id=pad,
                )
            # HF returns nothing before the batch ends: its time to first token is the
            # batch's completion time, measured from the start of the workload.
            ttfts += [time.perf_counter() - start] * len(batch)
        total = time.perf_counter() - start
        return {
            "useful_tok_s": sum(output_lens) / total,
            "total_s": total,
            "ttft_s": _percentiles(ttfts),
            "itl_s": {"p50": float("nan"), "p99": float("nan")},
            "preemptions": 0,
        }


SYSTEMS = {"streamgen": StreamgenSystem, "hf": HFGenerateSystem}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    system = SYSTEMS[args.system](args.model, args.dtype)
    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("kind") == "workload":
            result = system.run_workload(
                request["prompts"], request["output_lens"], **request.get("config", {})
            )
        else:
            result = system.run(request["prompt_ids"], request["new_tokens"])
        out.write(json.dumps(result) + "\n")
        out.flush()


class WorkerProcess:
    """Parent-side handle of a worker process."""

    def __init__(self, system: str, dtype: str, threads: int, model: str | None) -> None:
        import subprocess

        cmd = [sys.executable, "-m", "bench.worker", system, "--dtype", dtype,
               "--threads", str(threads)]
        if model:
            cmd += ["--model", model]
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1"}
        self.name = system
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        self._read()  # {"ready": true}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.name!r} exited ({self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def run(self, prompt_ids: list[int], new_tokens: int) -> dict[str, Any]:
        return self._request({"prompt_ids": prompt_ids, "new_tokens": new_tokens})

    def run_workload(
        self, prompts: list[list[int]], output_lens: list[int], config: dict[str, Any]
    ) -> dict[str, Any]:
        request = {"kind": "workload", "prompts": prompts, "output_lens": output_lens,
                   "config": config}
        return self._request(request)

    def _request(self, request: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    main()

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
        assert self.proc.stdin is not None
        request = {"prompt_ids": prompt_ids, "new_tokens": new_tokens}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    main()

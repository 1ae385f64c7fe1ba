"""One system under test in its own process: `python -m bench.worker SYSTEM --dtype D ...`.

Each system gets a clean process (its own allocator, caches and thread
pool), so that one system's state cannot slow another: in one process,
streamgen decoded 15-20% slower after HF's model had run beside it. Thread
counts are pinned before torch starts (``OMP_NUM_THREADS`` and friends, then
``torch.set_num_threads``).

The parent sends one JSON line per arm and reads JSON lines back:

    <- {"ready": true}                  (or {"unavailable": "why"}) once loaded
    -> {"arm": {...}}                   (bench.workloads.Arm.to_json)
    <- {"progress": 37}                 (tokens so far; any number of these)
    <- {"traces": [...], "info": {...}} (or {"unavailable": "why"})
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from bench.workloads import Arm

PROGRESS_EVERY_S = 0.5
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def run_arm(system: Any, arm: Arm, progress: Callable[[int], None]) -> dict[str, Any]:
    """Run one arm in a fresh session of ``system``: warm requests, then the timed ones.

    A system that cannot run the arm, or fails in it, answers {"unavailable": why}
    (the traceback goes to stderr) and stays up for the next arm.
    """
    from bench.systems.base import Unavailable

    if arm.options.streamgen_only and not getattr(system, "runs_streamgen_only_arms", False):
        return {"unavailable": "not available: a streamgen-only arm"}
    try:
        session = system.session(arm.options)
    except Unavailable as why:
        return {"unavailable": str(why)}
    except Exception as err:
        traceback.print_exc()
        return {"unavailable": f"failed: {type(err).__name__}: {err}"}
    try:
        if arm.warm:
            session.run(arm.warm, lambda n: None)
        if not arm.sequential:
            traces = session.run(arm.requests, progress)
        else:
            start, traces = time.perf_counter(), []
            for request in arm.requests:
                offset = time.perf_counter() - start
                (trace,) = session.run([request], progress)
                traces.append(trace.shifted(offset))
        return {"traces": [t.to_json() for t in traces], "info": session.info()}
    except Unavailable as why:
        return {"unavailable": str(why)}
    except Exception as err:
        traceback.print_exc()
        return {"unavailable": f"failed: {type(err).__name__}: {err}"}
    finally:
        session.close()


class _ProgressWriter:
    """Counts tokens and writes a progress line at most every PROGRESS_EVERY_S."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.count = 0
        self.last = time.perf_counter()

    def __call__(self, tokens: int) -> None:
        self.count += tokens
        now = time.perf_counter()
        if now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            _send(self.out, {"progress": self.count})


def _send(out: IO[str], message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("system")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None)
    parser.add_argument("--gguf", default=None)
    args = parser.parse_args()
    import torch

    from bench.systems import build_system
    from bench.systems.base import Unavailable

    torch.set_num_threads(args.threads)
    # The protocol owns stdout; anything a library prints goes to stderr.
    out, sys.stdout = sys.stdout, sys.stderr
    try:
        system = build_system(args.system, args.model, args.gguf, args.dtype, args.threads)
    except Unavailable as why:
        _send(out, {"unavailable": str(why)})
        return
    _send(out, {"ready": True})
    for line in sys.stdin:
        arm = Arm.from_json(json.loads(line)["arm"])
        _send(out, run_arm(system, arm, _ProgressWriter(out)))


class WorkerProcess:
    """Parent-side handle of a worker process (started at construction, not waited for)."""

    def __init__(
        self, system: str, dtype: str, threads: int, model: str | None, gguf: str | None
    ) -> None:
        cmd = [sys.executable, "-m", "bench.worker", system, "--dtype", dtype,
               "--threads", str(threads)]  # fmt: skip
        if model:
            cmd += ["--model", model]
        if gguf:
            cmd += ["--gguf", gguf]
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
               **{name: str(threads) for name in THREAD_ENV}}  # fmt: skip
        self.name = system
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
            cwd=Path(__file__).resolve().parent.parent,
        )  # fmt: skip

    def wait_ready(self) -> str | None:
        """Block until the model is loaded; the reason if the system cannot run here."""
        message = self._read()
        return message.get("unavailable")

    def run_arm(self, arm: Arm, on_progress: Callable[[int], None]) -> dict[str, Any]:
        """Run ``arm``; ``on_progress(tokens_so_far)`` is called while it runs."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"arm": arm.to_json()}) + "\n")
        self.proc.stdin.flush()
        while "progress" in (message := self._read()):
            on_progress(message["progress"])
        return message

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker {self.name!r} exited ({self.proc.wait()})")
        message: dict[str, Any] = json.loads(line)
        return message

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


WorkerKey = tuple[str, str, int, "str | None", "str | None"]  # system, dtype, threads, model, gguf


class WorkerPool:
    """Worker processes by (system, dtype, threads, model, gguf), kept until the pool closes.

    One command uses one pool; the harness test shares one across scenarios
    so that it starts each worker once. Sessions are fresh per arm either way.
    """

    def __init__(self) -> None:
        self._workers: dict[WorkerKey, WorkerProcess] = {}
        self._unavailable: dict[WorkerKey, str] = {}

    def acquire(
        self, systems: list[str], dtype: str, threads: int, model: str | None, gguf: str | None
    ) -> tuple[dict[str, WorkerProcess], dict[str, str]]:
        """Ready workers by system, and why the others cannot run; new ones load in parallel."""
        keys = {name: (name, dtype, threads, model, gguf) for name in systems}
        started = {}
        for name, key in keys.items():
            if key not in self._workers and key not in self._unavailable:
                started[key] = WorkerProcess(name, dtype, threads, model, gguf)
        for key, worker in started.items():
            reason = worker.wait_ready()
            if reason is None:
                self._workers[key] = worker
            else:
                self._unavailable[key] = reason
                worker.close()
        ready = {name: self._workers[key] for name, key in keys.items() if key in self._workers}
        refused = {n: self._unavailable[k] for n, k in keys.items() if k in self._unavailable}
        return ready, refused

    def close(self) -> None:
        for worker in self._workers.values():
            worker.close()
        self._workers.clear()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    main()

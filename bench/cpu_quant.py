"""The quantized CPU core against llama.cpp on the same GGUF and thread count.

    python -m bench.cpu_quant [--threads 1,2] [--repeats 3] [--gguf FILE] [--works ...]

Works (each run for both systems in alternation, every repetition, medians reported):

* ``decode``: batch-1 generation of 128 tokens after a 1-token prompt; streamgen's
  rate from its token timestamps, llama.cpp's from ``llama-bench -p 0 -n 128`` (tg128).
* ``prefill``: a 512-token prompt; streamgen's 512 / time to first token, llama.cpp's
  ``llama-bench -p 512 -n 0`` (pp512).
* ``concurrent``: 32 requests at once, prompts of 50-450 token ids (fixed seed), 128
  new tokens each, EOS ignored; total output tokens over wall time; llama.cpp through
  ``llama-server -np 32`` (continuous batching) and its ``/completion`` endpoint with
  the same token-id prompts.

streamgen runs in this process (one Engine per thread count, reused across repetitions);
llama.cpp's tools run as subprocesses, built by ``bench/llama_cpp_tools.py``. The record
names the CPU flags, and the decode floor: the file's tensor bytes read once per token
at the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import git_commit, machine, run_and_record, standalone_parser
from bench.llama_cpp_tools import ISA_CMAKE_FLAGS, simd_flags, tool
from streamgen.native.qkernels import ISA_ENV_VAR

WORKS = ("decode", "prefill", "concurrent")


def _engine(gguf: Path, threads: int, max_num_seqs: int = 64) -> Any:
    from streamgen import Engine, EngineConfig

    # No prefix caching: repetitions reuse the prompts, and llama.cpp's runs start cold too.
    config = EngineConfig(
        threads=threads, kv_cache_bytes=1 << 30, max_num_seqs=max_num_seqs,
        enable_prefix_caching=False,
    )
    return Engine(str(gguf), config)


async def _stream_times(engine: Any, prompt: list[int], new_tokens: int) -> list[float]:
    from streamgen import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    times = [start]
    async for _ in engine.stream(prompt, params):
        times.append(time.perf_counter())
    return times


async def streamgen_decode(engine: Any) -> float:
    times = await _stream_times(engine, [1], 128)
    return (len(times) - 2) / (times[-1] - times[1])


async def streamgen_prefill(engine: Any, prompt: list[int]) -> float:
    times = await _stream_times(engine, prompt, 1)
    return len(prompt) / (times[1] - times[0])


async def streamgen_concurrent(engine: Any, prompts: list[list[int]]) -> float:
    start = time.perf_counter()
    runs = await asyncio.gather(*(_stream_times(engine, p, 128) for p in prompts))
    return sum(len(t) - 1 for t in runs) / (time.perf_counter() - start)


def llama_bench(gguf: Path, threads: int, prompt: int, gen: int, isa: str = "native") -> float:
    out = subprocess.run(
        [str(tool("llama-bench", isa)), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
         "-n", str(gen), "-r", "1", "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(json.loads(out)[0]["avg_ts"])


def llama_server_concurrent(
    gguf: Path, threads: int, prompts: list[list[int]], isa: str = "native", repack: bool = True
) -> float:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = len(prompts) * (max(len(p) for p in prompts) + 128 + 16)
    server = subprocess.Popen(
        [str(tool("llama-server", isa)), "-m", str(gguf), "-t", str(threads),
         "-np", str(len(prompts)), "-c", str(ctx), "--port", str(port), "--host", "127.0.0.1",
         *(() if repack else ("--no-repack",))],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        _wait_healthy(port, server)
        tokens: list[int] = []

        def one(prompt: list[int]) -> None:
            body = json.dumps({"prompt": prompt, "n_predict": 128, "ignore_eos": True,
                               "temperature": 0, "cache_prompt": False}).encode()  # fmt: skip
            request = urllib.request.Request(f"http://127.0.0.1:{port}/completion", body,
                                             {"Content-Type": "application/json"})  # fmt: skip
            with urllib.request.urlopen(request, timeout=3600) as response:
                tokens.append(int(json.load(response)["tokens_predicted"]))

        start = time.perf_counter()
        workers = [threading.Thread(target=one, args=(p,)) for p in prompts]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        return sum(tokens) / (time.perf_counter() - start)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _wait_healthy(port: int, server: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if server.poll() is not None:  # died while loading: say how, at once
            code = server.returncode
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise RuntimeError(f"llama-server stopped before it was healthy ({how})")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("llama-server did not become healthy")


def _copy_bandwidth(threads: int) -> float:
    from bench.roofline import measure_copy_bandwidth

    return measure_copy_bandwidth(threads)


def _tensor_bytes(gguf: Path) -> int:
    from streamgen.checkpoint.gguf_file import read_gguf_file

    return sum(t.nbytes for t in read_gguf_file(gguf).tensors.values())


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from streamgen.checkpoint import default_gguf_path

    gguf = Path(args.gguf) if args.gguf else default_gguf_path()
    rng = random.Random(0)
    prefill_prompt = [rng.randrange(100, 40000) for _ in range(512)]
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randint(50, 450))]
               for _ in range(args.requests)]  # fmt: skip
    rows = []
    peer_notes: set[str] = set()
    for threads in args.threads:
        samples: dict[tuple[str, str], list[float]] = {}
        # One engine per thread count, started once and warmed up (llama-bench warms up too).
        async with _engine(gguf, threads) as engine:
            await streamgen_decode(engine)
            for rep in range(args.repeats):
                for work in args.works:
                    order = ("streamgen", "llama.cpp")
                    for system in order if rep % 2 == 0 else order[::-1]:
                        if system == "streamgen":
                            value = await _measure_streamgen(engine, work, prefill_prompt, prompts)
                        else:
                            value = await asyncio.to_thread(
                                _measure_llama_cpp, work, gguf, threads, prompts, args.isa,
                                peer_notes,
                            )
                        samples.setdefault((work, system), []).append(value)
                        print(f"threads={threads} rep={rep} {work} {system}: {value:.1f} tok/s",
                              file=sys.stderr)  # fmt: skip
        bandwidth = _copy_bandwidth(threads)  # bytes/s
        floor = bandwidth / _tensor_bytes(gguf)
        for work in args.works:
            ours = statistics.median(samples[(work, "streamgen")])
            peer = statistics.median(samples[(work, "llama.cpp")])
            rows.append({
                "work": work, "threads": threads, "streamgen_tok_s": ours, "llama_cpp_tok_s": peer,
                "ratio": ours / peer, "samples": {s: samples[(work, s)] for s in
                                                  ("streamgen", "llama.cpp")},
                "floor_tok_s": floor if work == "decode" else None,
                "copy_gb_s": bandwidth / 1e9,
            })  # fmt: skip
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "format": 3, "scenario": "cpu_quant", "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.cpu_quant " + shlex.join(sys.argv[1:]),
        "commit": git_commit(), "machine": machine(), "cpu_flags": simd_flags(),
        "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "repeats": args.repeats,
        "requests": args.requests, "rows": rows, "isa": args.isa,
        **({"notes": notes} if (notes := _notes(args.isa) + sorted(peer_notes)) else {}),
    }  # fmt: skip


def _notes(isa: str) -> list[str]:
    """What a reader needs to know of the two builds compared."""
    if isa != "native":
        return [
            "ISA avx2: an AVX2-only machine emulated on this CPU: streamgen ran its AVX2 "
            "kernels (STREAMGEN_NATIVE_ISA=avx2), llama.cpp a build without AVX-512 and "
            "VNNI (bench/llama_cpp_tools.py ISA_CMAKE_FLAGS['avx2']); this CPU's memory "
            "and clocks, not those of a real AVX2-only part."
        ]
    if "amx_int8" in simd_flags():
        return [
            "This CPU has AMX: llama.cpp's native build compiles its AMX int8 kernels "
            "(ggml's AMX buffer type, weights repacked at load); streamgen has none."
        ]
    return []


async def _measure_streamgen(
    engine: Any, work: str, prefill_prompt: list[int], prompts: list[list[int]]
) -> float:
    if work == "decode":
        return await streamgen_decode(engine)
    if work == "prefill":
        return await streamgen_prefill(engine, prefill_prompt)
    return await streamgen_concurrent(engine, prompts)


# Said in the record when llama-server had to run without its repacked weights.
NO_REPACK_NOTE = (
    "llama-server crashed at start with its repacked weights (on an AMX Xeon: SIGSEGV in "
    "ggml_backend_amx_mul_mat, while llama-bench ran them), so it ran with --no-repack: "
    "ggml's plain CPU kernels, no AMX buffer."
)


def _measure_llama_cpp(
    work: str, gguf: Path, threads: int, prompts: list[list[int]], isa: str, notes: set[str]
) -> float:
    if work == "decode":
        return llama_bench(gguf, threads, 0, 128, isa)
    if work == "prefill":
        return llama_bench(gguf, threads, 512, 0, isa)
    if NO_REPACK_NOTE not in notes:
        try:
            return llama_server_concurrent(gguf, threads, prompts, isa)
        except RuntimeError as exc:
            if "signal" not in str(exc):
                raise
            print(f"llama-server: {exc}; retrying with --no-repack", file=sys.stderr)
            notes.add(NO_REPACK_NOTE)
    return llama_server_concurrent(gguf, threads, prompts, isa, repack=False)


def render(record: dict[str, Any]) -> str:
    labels = {
        "decode": "batch-1 decode (tg128)",
        "prefill": "prefill (pp512)",
        "concurrent": f"{record['requests']} requests at once, 128 new tokens each",
    }
    lines = [
        f"## cpu_quant — {record['date']}", "",
        f"- command: `{record['command']}`",
        f"- commit: `{record['commit']}`; machine: {record['machine']}; "
        f"CPU flags: {', '.join(record['cpu_flags'])}",
        f"- {record['gguf']} ({record['gguf_bytes'] / 1e6:.1f} MB); streamgen's quantized "
        f"path vs llama.cpp {record.get('llama_cpp', '(llama-cpp-python 0.3.36 vendored source)')} "
        f"on the same file and thread count; medians of {record['repeats']}, systems "
        "alternating", "",
        "| work | threads | streamgen tok/s | llama.cpp tok/s | streamgen ÷ llama.cpp "
        "| decode floor tok/s (share) |",
        "|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in record["rows"]:
        floor = (f"{r['floor_tok_s']:.0f} ({r['streamgen_tok_s'] / r['floor_tok_s']:.0%})"
                 if r.get("floor_tok_s") else "-")  # fmt: skip
        lines.append(
            f"| {labels[r['work']]} | {r['threads']} | {r['streamgen_tok_s']:.1f} "
            f"| {r['llama_cpp_tok_s']:.1f} | **{r['ratio']:.2f}x** | {floor} |"
        )
    lines += ["", "Decode floor: the file's tensor bytes read once per token at the measured "
              "copy bandwidth (array copy, same thread count)."]  # fmt: skip
    lines += [f"\n{note}" for note in record.get("notes", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = standalone_parser("cpu_quant", __doc__)
    parser.add_argument("--threads", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--gguf", default=None)
    parser.add_argument("--works", type=lambda s: s.split(","), default=list(WORKS))
    parser.add_argument(
        "--isa", choices=sorted(ISA_CMAKE_FLAGS), default="native",
        help="avx2: both systems restricted to AVX2 kernels (streamgen through "
        "STREAMGEN_NATIVE_ISA, llama.cpp built without AVX-512 / VNNI): an AVX2-only machine, "
        "emulated",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.isa != "native":
        os.environ[ISA_ENV_VAR] = args.isa
    return run_and_record("cpu_quant", run, render, args)


if __name__ == "__main__":
    raise SystemExit(main())

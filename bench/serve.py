"""The HTTP layer's cost: 32 streaming clients through `streamgen serve` against the same
32 requests through the SDK, and through llama.cpp's `llama-server -np 32` (its OpenAI
`/v1/completions`, the same client code), in one run, alternating.

    python -m bench.serve [--threads 2] [--repeats 3] [--requests 32]

Both arms serve the default model (its GGUF, the quantized path) with the same engine
settings, prompts of 50-450 token ids (fixed seed), 128 new tokens each, greedy, EOS
ignored, all submitted at once. The SDK arm runs `engine.stream()` in this process; the
HTTP arm starts `streamgen serve` as a subprocess (a server is another process in use)
and reads `/v1/completions` server-sent events with httpx, one connection per request.
The llama.cpp arm serves the same GGUF with the same thread count (built by
bench/llama_cpp_tools.py; `--no-llama-cpp` skips it). Each arm reports output tokens over
wall time; the record names the CPU flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from typing import Any

from bench.common import git_commit, machine, run_and_record, standalone_parser
from bench.llama_cpp_tools import simd_flags

NEW_TOKENS = 128
MAX_MODEL_LEN = 1024
KV_CACHE_MB = 512


def prompts(count: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(50, 450))] for _ in range(count)]


async def sdk_arm(engine: Any, batch: list[list[int]]) -> float:
    from streamgen import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)

    async def one(prompt: list[int]) -> int:
        return sum([1 async for _ in engine.stream(prompt, params)])

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(p) for p in batch))
    return sum(tokens) / (time.perf_counter() - start)


async def http_arm(url: str, batch: list[list[int]]) -> float:
    import httpx

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> int:
        body = {"model": "bench", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": True}  # fmt: skip
        tokens = 0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    tokens += len(json.loads(line[6:])["choices"])
        return tokens

    limits = httpx.Limits(max_connections=len(batch) + 4)
    async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(client, p) for p in batch))
        return sum(tokens) / (time.perf_counter() - start)


async def _wait_healthy(url: str, server: subprocess.Popen[bytes]) -> None:
    import httpx

    for _ in range(1200):
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if server.poll() is not None:
            raise RuntimeError(f"{server.args[0]} exited")
        await asyncio.sleep(0.2)
    raise RuntimeError(f"{server.args[0]} did not become healthy")


@asynccontextmanager
async def server_process(command: Callable[[int], list[str]], quiet: bool) -> Any:
    """``command(port)`` run on a free port until it answers /health; its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    output = subprocess.DEVNULL if quiet else None
    server = subprocess.Popen(command(port), stdout=output, stderr=output)
    url = f"http://127.0.0.1:{port}"
    try:
        await _wait_healthy(url, server)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def llama_served(threads: int, requests: int) -> Any:
    """``llama-server -np requests`` on the default GGUF (llama.cpp logs every request)."""
    from bench.llama_cpp_tools import tool
    from streamgen.checkpoint import default_gguf_path

    return server_process(lambda port: [
        str(tool("llama-server")), "-m", str(default_gguf_path()), "-t", str(threads),
        "-np", str(requests), "-c", str(requests * (450 + NEW_TOKENS + 16)),
        "--port", str(port), "--host", "127.0.0.1",
    ], quiet=True)  # fmt: skip


def served(threads: int) -> Any:
    """``streamgen serve`` with the SDK arm's engine settings."""
    return server_process(lambda port: [
        sys.executable, "-m", "streamgen", "serve", "--port", str(port), "--threads",
        str(threads), "--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-mb", str(KV_CACHE_MB),
        "--served-model-name", "bench", "--log-level", "warning",
    ], quiet=False)  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from streamgen import Engine, EngineConfig

    batch = prompts(args.requests)
    config = EngineConfig(
        threads=args.threads, max_model_len=MAX_MODEL_LEN, kv_cache_bytes=KV_CACHE_MB << 20
    )
    arms = ("sdk", "http", "llama.cpp") if args.llama_cpp else ("sdk", "http")
    samples: dict[str, list[float]] = {arm: [] for arm in arms}
    async with contextlib.AsyncExitStack() as stack:
        engine = await stack.enter_async_context(Engine(None, config))
        urls = {"http": await stack.enter_async_context(served(args.threads))}
        if args.llama_cpp:
            urls["llama.cpp"] = await stack.enter_async_context(
                llama_served(args.threads, args.requests)
            )
        await sdk_arm(engine, batch[:2])  # warm every arm up
        for url in urls.values():
            await http_arm(url, batch[:2])
        for rep in range(args.repeats):
            for arm in arms if rep % 2 == 0 else arms[::-1]:
                run_arm = sdk_arm(engine, batch) if arm == "sdk" else http_arm(urls[arm], batch)
                value = await run_arm
                samples[arm].append(value)
                print(f"rep={rep} {arm}: {value:.1f} tok/s", file=sys.stderr)
    sdk, http = statistics.median(samples["sdk"]), statistics.median(samples["http"])
    llama = statistics.median(samples["llama.cpp"]) if args.llama_cpp else None
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "format": 1, "scenario": "serve", "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.serve " + shlex.join(sys.argv[1:]),
        "commit": git_commit(), "machine": machine(), "cpu_flags": simd_flags(),
        "threads": args.threads, "repeats": args.repeats, "requests": args.requests,
        "sdk_tok_s": sdk, "http_tok_s": http, "ratio": http / sdk, "samples": samples,
        "llama_cpp_tok_s": llama, "paired_ratio": paired_ratio(samples),
    }  # fmt: skip


def paired_ratio(samples: dict[str, list[float]]) -> float:
    """HTTP over SDK per repetition (the two ran back to back), their median: steadier
    than the ratio of medians on a machine whose speed drifts between repetitions."""
    return statistics.median(h / s for h, s in zip(samples["http"], samples["sdk"], strict=True))


def render(record: dict[str, Any]) -> str:
    return "\n".join([
        f"## serve — {record['date']}", "",
        f"- command: `{record['command']}`",
        f"- commit: `{record['commit']}`; machine: {record['machine']}; "
        f"CPU flags: {', '.join(record['cpu_flags'])}",
        f"- {record['requests']} requests at once (prompts of 50-450 token ids, "
        f"{NEW_TOKENS} new tokens each, greedy, EOS ignored), the default GGUF, "
        f"{record['threads']} threads; medians of {record['repeats']}, arms alternating", "",
        "| arm | tok/s |", "|---|---|",
        f"| SDK (`engine.stream`, in process) | {record['sdk_tok_s']:.1f} |",
        f"| HTTP (`streamgen serve`, SSE, httpx clients) | {record['http_tok_s']:.1f} |",
        f"| HTTP ÷ SDK, median of the repetitions' ratios | "
        f"**{record.get('paired_ratio', record['ratio']):.2f}x** |",
        f"| HTTP ÷ SDK, ratio of the medians | {record['ratio']:.2f}x |",
        *([f"| llama.cpp (`llama-server -np {record['requests']}`, its `/v1/completions`, "
           f"the same clients) | {record['llama_cpp_tok_s']:.1f} |",
           f"| streamgen HTTP ÷ llama-server | "
           f"**{record['http_tok_s'] / record['llama_cpp_tok_s']:.2f}x** |"]
          if record.get("llama_cpp_tok_s") else []),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = standalone_parser("serve", __doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--no-llama-cpp", dest="llama_cpp", action="store_false")
    args = parser.parse_args(argv)
    return run_and_record("serve", run, render, args)


if __name__ == "__main__":
    raise SystemExit(main())

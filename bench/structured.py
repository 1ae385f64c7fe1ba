"""The cost of structured outputs: decode tokens/s with a JSON schema against the same
requests unconstrained, at batch 1 and 32 requests at once, in one run, alternating; and
the first-token delay a new (not yet compiled) schema adds.

    python -m bench.structured [--threads 2] [--repeats 3] [--requests 32]

Both arms serve the default model (its GGUF, the quantized path) with the same engine.
The constrained arm's schema asks for a long output (an array of at least 48 strings), so
both arms decode exactly ``NEW_TOKENS`` tokens per request (the plain one ignores EOS);
each arm reports output tokens over wall time. The compile figure: time to first token of
a request whose schema is new (its property names differ each time) against one whose
schema is compiled, alternating, median and p99 of each. The record names the CPU flags.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shlex
import statistics
import sys
import time
from typing import Any

from bench.common import git_commit, machine, run_and_record, standalone_parser
from bench.llama_cpp_tools import simd_flags

NEW_TOKENS = 128
LISTS = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "items": {"type": "array", "items": {"type": "string", "minLength": 3, "maxLength": 24},
                  "minItems": 48, "maxItems": 64},  # longer than NEW_TOKENS: both arms hit it
    },
    "required": ["title", "items"],
}
PROMPT = "List every fruit, vegetable and spice you know, as JSON with a title and items."


def chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{PROMPT} (list {i})"}]


async def decode_arm(engine: Any, requests: int, constrained: bool) -> float:
    from streamgen import SamplingParams, StructuredOutputs

    constraint = StructuredOutputs(json=LISTS) if constrained else None
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=not constrained,
                            structured_outputs=constraint)  # fmt: skip

    async def one(i: int) -> int:
        return sum([1 async for _ in engine.stream(chat(i), params)])

    start = time.perf_counter()
    tokens = await asyncio.gather(*(one(i) for i in range(requests)))
    return sum(tokens) / (time.perf_counter() - start)


async def first_token_s(engine: Any, schema: dict[str, Any]) -> float:
    from streamgen import SamplingParams, StructuredOutputs

    params = SamplingParams(temperature=0, max_tokens=1,
                            structured_outputs=StructuredOutputs(json=schema))  # fmt: skip
    start = time.perf_counter()
    async for _ in engine.stream(chat(0), params):
        break
    return time.perf_counter() - start


def fresh_schema(i: int) -> dict[str, Any]:
    """A schema no request used before (so it is compiled on arrival)."""
    return {"type": "object", "properties": {f"name_{i}": {"type": "string"},
            f"count_{i}": {"type": "integer"}, f"tags_{i}": {"type": "array",
            "items": {"enum": ["a", "b", f"c{i}"]}}}, "required": [f"name_{i}"]}  # fmt: skip


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from streamgen import Engine, EngineConfig

    config = EngineConfig(threads=args.threads, max_model_len=1024, kv_cache_bytes=512 << 20)
    samples: dict[str, list[float]] = {}
    async with Engine(None, config) as engine:
        await decode_arm(engine, 2, True)  # warm up, compile the schema once
        await decode_arm(engine, 2, False)
        for rep in range(args.repeats):
            for batch in (1, args.requests):
                arms = (False, True) if rep % 2 == 0 else (True, False)
                for constrained in arms:
                    key = f"{'json' if constrained else 'plain'}@{batch}"
                    value = await decode_arm(engine, batch, constrained)
                    samples.setdefault(key, []).append(value)
                    print(f"rep={rep} {key}: {value:.1f} tok/s", file=sys.stderr)
        cached = fresh_schema(-1)
        await first_token_s(engine, cached)
        ttft: dict[str, list[float]] = {"new": [], "cached": []}
        for i in range(args.compiles):
            ttft["new"].append(await first_token_s(engine, fresh_schema(i)))
            ttft["cached"].append(await first_token_s(engine, cached))
        core = engine._core
        mask_ms_per_step = 1e3 * core.masks.seconds / max(1, core.num_steps) if core else 0.0
    medians = {key: statistics.median(values) for key, values in samples.items()}
    paired = {
        f"@{batch}": statistics.median(
            j / p for j, p in zip(samples[f"json@{batch}"], samples[f"plain@{batch}"], strict=True)
        )
        for batch in (1, args.requests)
    }  # fmt: skip
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "format": 1, "scenario": "structured", "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.structured " + shlex.join(sys.argv[1:]),
        "commit": git_commit(), "machine": machine(), "cpu_flags": simd_flags(),
        "threads": args.threads, "repeats": args.repeats, "requests": args.requests,
        "tok_s": medians, "paired_ratio": paired, "samples": samples,
        "ttft_ms": {k: {"p50": 1e3 * statistics.median(v), "p99": 1e3 * p99(v)}
                    for k, v in ttft.items()},
        "compiles": args.compiles, "mask_ms_per_step": mask_ms_per_step,
    }  # fmt: skip


def render(record: dict[str, Any]) -> str:
    n = record["requests"]
    tok, ratio, ttft = record["tok_s"], record["paired_ratio"], record["ttft_ms"]
    return "\n".join([
        f"## structured — {record['date']}", "",
        f"- command: `{record['command']}`",
        f"- commit: `{record['commit']}`; machine: {record['machine']}; "
        f"CPU flags: {', '.join(record['cpu_flags'])}",
        f"- the default GGUF, {record['threads']} threads, greedy, up to {NEW_TOKENS} new "
        f"tokens; JSON schema arm: an object with a title and 48-64 strings; medians of "
        f"{record['repeats']}, arms alternating; mask time "
        f"{record['mask_ms_per_step']:.2f} ms per engine step (all steps)", "",
        "| batch | unconstrained tok/s | JSON schema tok/s | schema ÷ plain (median of paired) |",
        "|---|---|---|---|",
        f"| 1 | {tok['plain@1']:.1f} | {tok['json@1']:.1f} | **{ratio['@1']:.2f}x** |",
        f"| {n} | {tok[f'plain@{n}']:.1f} | {tok[f'json@{n}']:.1f} | **{ratio[f'@{n}']:.2f}x** |",
        "",
        f"Time to first token, {record['compiles']} requests each, alternating: a new schema "
        f"(compiled on arrival) p50 {ttft['new']['p50']:.1f} ms / p99 {ttft['new']['p99']:.1f} ms; "
        f"a compiled one p50 {ttft['cached']['p50']:.1f} ms / p99 {ttft['cached']['p99']:.1f} ms.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = standalone_parser("structured", __doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--compiles", type=int, default=20)
    args = parser.parse_args(argv)
    return run_and_record("structured", run, render, args)


if __name__ == "__main__":
    raise SystemExit(main())

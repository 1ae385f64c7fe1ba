"""Throughput: N requests (default 64) with chat-like lengths, all at once and Poisson arrivals.

Prompt (20-600 tokens) and output (16-256) lengths are log-uniform from a
fixed seed (many short requests, a few long ones); prompts are random token
ids (the work, not the text, is measured). The same requests arrive all at
once, then as Poisson processes at each ``--rates`` (requests/s). Output
tokens/s over first arrival to last token, TTFT and ITL p50/p99; the
throughput plot puts each arm at its mean number of requests in flight.
"""

from __future__ import annotations

import argparse

from bench.common import RunOptions
from bench.runner import Plan
from bench.workloads import Arm, ModelInfo, SystemOptions, chat_mix, poisson_arrivals

DEFAULT_SYSTEMS = ("streamgen", "hf", "hf_cb", "llamacpp")
DEFAULT_DTYPES = ("float32",)
NOTES = {
    "hf": "HF `generate` hands tokens out only when its batch ends; its TTFT and ITL here "
    "are when the tokens were computed (generous to it).",
    "llamacpp": "llama.cpp (llama-cpp-python) holds one sequence: it serves the requests "
    "one at a time, on Q4_1 weights (a reference, not equal work).",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument(
        "--rates",
        default="0.2,0.4",
        help="Poisson arrival rates in requests/s, comma-separated ('' for none)",
    )
    parser.add_argument("--hf-batch-size", type=int, default=8)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-mb", type=int, default=2048)


def plan(args: argparse.Namespace, opts: RunOptions, info: ModelInfo) -> Plan:
    if opts.quick:
        num, prompt_range, output_range, rates = 8, (8, 40), (4, 12), [4.0]
    else:
        num, prompt_range, output_range = args.requests, (20, 600), (16, 256)
        rates = [float(r) for r in args.rates.split(",") if r]
    requests = chat_mix(num, opts.seed, prompt_range, output_range, info.spec.vocab_size)
    options = SystemOptions(
        hf_batch_size=args.hf_batch_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_bytes=args.kv_cache_mb << 20,
    )
    arms = [Arm("all at once", tuple(requests), options)]
    arms += [
        Arm(f"poisson {rate:g}/s", tuple(poisson_arrivals(requests, rate, opts.seed)), options)
        for rate in rates
    ]
    total = sum(r.output_len for r in requests)
    return Plan(
        arms=tuple(arms),
        description=f"{num} requests, prompts {prompt_range[0]}-{prompt_range[1]} tokens, "
        f"outputs {output_range[0]}-{output_range[1]} "
        f"({total} output tokens), log-uniform lengths, seed {opts.seed}; "
        f"HF `generate` in static batches of {args.hf_batch_size}",
        throughput_plot=True,
        notes=tuple(note for system, note in NOTES.items() if system in opts.systems),
    )

"""Batch-1 latency: ~100-token chat prompt, 128 new tokens: TTFT, inter-token latency, tok/s.

One request at a time, the same prompt ids for every system; tok/s counts
the whole request (prefill included): new tokens over submission-to-last-token.
"""

from __future__ import annotations

import argparse

from bench import texts
from bench.common import RunOptions
from bench.runner import Plan
from bench.workloads import Arm, ModelInfo, Request

DEFAULT_SYSTEMS = ("streamgen", "hf", "hf_cb", "llamacpp")
DEFAULT_DTYPES = ("float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--new-tokens", type=int, default=128)


def plan(args: argparse.Namespace, opts: RunOptions, info: ModelInfo) -> Plan:
    prompt = info.chat(texts.LATENCY_QUESTION)
    new_tokens = 16 if opts.quick else args.new_tokens
    return Plan(
        arms=(Arm("batch 1", (Request(prompt, new_tokens),)),),
        description=f"batch 1, {len(prompt)}-token chat prompt, {new_tokens} new tokens "
        "(tok/s includes the prefill)",
        metric="tok/s",
    )

"""Prefix caching: requests sharing a long system prompt, with the prefix cache on vs off.

A first request (untimed) puts the ~500-token system prompt in the cache, as
in a service that has run for a while; then N requests (default 16) with
the same system prompt and different questions arrive at once. Each
system's cache is fresh per arm and repetition. Static HF `generate` has no
prefix cache (its "on" arm is not available); llama.cpp reuses the KV of
the prefix it shares with its previous request.
"""

from __future__ import annotations

import argparse

from bench import texts
from bench.common import RunOptions
from bench.runner import Plan
from bench.workloads import Arm, ModelInfo, Request, SystemOptions

DEFAULT_SYSTEMS = ("streamgen", "hf", "hf_cb", "llamacpp")
DEFAULT_DTYPES = ("float32",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)


def questions(num: int) -> list[str]:
    """``num`` distinct questions, cycling through the fixed list."""
    base = texts.PREFIX_QUESTIONS
    return [
        base[i % len(base)] + (f" (ticket {i // len(base)})" if i >= len(base) else "")
        for i in range(num)
    ]


def plan(args: argparse.Namespace, opts: RunOptions, info: ModelInfo) -> Plan:
    system = texts.SYSTEM_PROMPT
    num, new_tokens = (4, 8) if opts.quick else (args.requests, args.new_tokens)
    if opts.quick:
        system = " ".join(system.split()[:60])
    requests = tuple(Request(info.chat(q, system=system), new_tokens) for q in questions(num))
    warm = (Request(info.chat("Hello, who are you?", system=system), 4),)
    shared = len(info.chat("", system=system))
    return Plan(
        arms=(
            Arm("cache off", requests, SystemOptions(prefix_caching=False), warm),
            Arm("cache on", requests, SystemOptions(prefix_caching=True), warm),
        ),
        description=f"{num} requests at once sharing a ~{shared}-token system prompt "
        f"(primed by one earlier request), {new_tokens} new tokens each",
        baseline_arm="cache off",
        notes=(
            "The roofline counts every prompt token; a prefix cache skips the shared ones, "
            "so its share can pass 100%.",
        ),
    )

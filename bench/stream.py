"""Streams with slow consumers: fast streams must keep their throughput beside slow readers.

``--slow`` streams start first and sleep ``--read-delay-ms`` after each token;
``--head-start-s`` later (their prompts done, their buffers full) ``--fast``
streams arrive and read every token at once. streamgen pauses a stream whose
buffer (``--stream-buffer`` tokens) is full, so the slow readers should cost
the fast ones next to nothing. Compared: the fast streams' output tokens/s
alone vs beside the slow ones (cancelled once the fast ones finish); only
fast streams are counted, from their own arrival.
"""

from __future__ import annotations

import argparse
import random

from bench.common import RunOptions
from bench.runner import Plan
from bench.workloads import Arm, ModelInfo, Request, SystemOptions

DEFAULT_SYSTEMS = ("streamgen",)
DEFAULT_DTYPES = ("float32",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fast", type=int, default=8)
    parser.add_argument("--slow", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--read-delay-ms", type=float, default=1000.0)
    parser.add_argument("--stream-buffer", type=int, default=16)
    parser.add_argument(
        "--head-start-s",
        type=float,
        default=4.0,
        help="the slow streams start this much earlier than the fast ones",
    )


def plan(args: argparse.Namespace, opts: RunOptions, info: ModelInfo) -> Plan:
    if opts.quick:
        fast, slow, new_tokens, prompt_len, delay, buffer, head = 2, 2, 16, 16, 0.2, 4, 0.5
    else:
        fast, slow, new_tokens = args.fast, args.slow, args.new_tokens
        prompt_len, delay = args.prompt_tokens, args.read_delay_ms / 1e3
        buffer, head = args.stream_buffer, args.head_start_s
    rng = random.Random(opts.seed)
    top = min(40000, info.spec.vocab_size)

    def prompt() -> tuple[int, ...]:
        return tuple(rng.randrange(top // 2, top) for _ in range(prompt_len))

    fast_requests = tuple(
        Request(prompt(), new_tokens, arrival_s=head, tag="fast") for _ in range(fast)
    )
    slow_requests = tuple(
        Request(prompt(), new_tokens, read_delay_s=delay, tag="slow") for _ in range(slow)
    )
    options = SystemOptions(stream_buffer=buffer, stop_slow_when_fast_done=True)
    return Plan(
        arms=(
            Arm("fast only", fast_requests, options, metric_tag="fast"),
            Arm("fast + slow", fast_requests + slow_requests, options, metric_tag="fast"),
        ),
        description=f"{fast} fast streams alone vs beside {slow} slow ones (a token every "
        f"{delay * 1e3:.0f} ms, started {head:g} s earlier), {prompt_len}-token prompts, "
        f"{new_tokens} new tokens, stream buffer {buffer}",
        metric="fast tok/s",
        baseline_arm="fast only",
        notes=(
            "Only the fast streams count (tok/s, TTFT, ITL, roofline), from their arrival. "
            "Each slow stream still costs the tokens its reader takes.",
        ),
    )

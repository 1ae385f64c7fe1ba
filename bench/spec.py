"""Speculation: input-grounded rewriting (rewrite / correct / extract a ~400-token text).

Three requests over a fixed passage (bench/texts.py; the "correct" task gets
typos from a fixed seed), one at a time, each ``--new-tokens`` long, without
and with speculation. streamgen's arm runs where ``EngineConfig`` has a
``speculation`` field (``--speculation`` is passed to it) and reports "not
available" otherwise; HF `generate` speculates with prompt lookup
(``prompt_lookup_num_tokens``), llama.cpp with ``LlamaPromptLookupDecoding``.
"""

from __future__ import annotations

import argparse

from bench.common import RunOptions
from bench.runner import Plan
from bench.workloads import Arm, ModelInfo, Request, SystemOptions, spec_prompts

DEFAULT_SYSTEMS = ("streamgen", "hf", "llamacpp")
DEFAULT_DTYPES = ("float32",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument(
        "--speculation", default="ngram", help="the value given to EngineConfig(speculation=...)"
    )
    parser.add_argument(
        "--speculative-tokens", type=int, default=8, help="draft length of the peers' prompt lookup"
    )


def plan(args: argparse.Namespace, opts: RunOptions, info: ModelInfo) -> Plan:
    new_tokens = 16 if opts.quick else args.new_tokens
    tasks = spec_prompts(info, opts.seed, max_words=60 if opts.quick else None)
    requests = tuple(Request(prompt, new_tokens, tag=name) for name, prompt in tasks)
    off = SystemOptions(prefix_caching=False)
    on = SystemOptions(
        prefix_caching=False,
        speculation=args.speculation,
        speculative_tokens=args.speculative_tokens,
    )
    lengths = "/".join(str(len(r.prompt)) for r in requests)
    return Plan(
        arms=(
            Arm("no speculation", requests, off, sequential=True),
            Arm("speculation", requests, on, sequential=True),
        ),
        description=f"{', '.join(n for n, _ in tasks)} of a fixed passage ({lengths}-token "
        f"prompts), one at a time, {new_tokens} new tokens each",
        metric="tok/s",
        baseline_arm="no speculation",
        notes=("Speculation can beat the roofline: it checks several tokens per weight read.",),
    )

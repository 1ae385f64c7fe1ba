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
import json

from bench.common import RunOptions
from bench.runner import Plan
from bench.workloads import Arm, ModelInfo, Request, SystemOptions, chat_mix, spec_prompts

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
    parser.add_argument(
        "--concurrent", type=int, default=32, help="requests in the concurrent arms"
    )


# Tree vs chain over the same n-gram drafter (SpeculationConfig fields as JSON).
NGRAM_TREE = '{"method": "ngram", "max_nodes": 24, "max_depth": 12, "branching": 3}'
NGRAM_CHAIN = '{"method": "ngram", "max_nodes": 12, "max_depth": 12, "branching": 1}'


def plan(args: argparse.Namespace, opts: RunOptions, info: ModelInfo) -> Plan:
    new_tokens = 16 if opts.quick else args.new_tokens
    tasks = spec_prompts(info, opts.seed, max_words=60 if opts.quick else None)
    requests = tuple(Request(prompt, new_tokens, tag=name) for name, prompt in tasks)
    off = SystemOptions(prefix_caching=False)

    def spec(setting: str, *, streamgen_only: bool = False) -> SystemOptions:
        return SystemOptions(
            prefix_caching=False,
            speculation=setting,
            speculative_tokens=args.speculative_tokens,
            streamgen_only=streamgen_only,
        )

    # Under load: the rewriting requests among chat traffic, all at once.
    num_chat = 4 if opts.quick else args.concurrent - len(requests)
    chat = chat_mix(num_chat, opts.seed, (20, 600), (16, new_tokens), info.spec.vocab_size)
    mixed = tuple(requests) + tuple(chat)
    adaptive = '{"method": "ngram", "max_nodes": 12, "max_depth": 8, "branching": 2}'
    # The target's first third of layers as its own draft.
    self_layers = max(1, info.spec.num_layers // 3)
    self_spec = json.dumps(
        {"method": "self", "self_layers": self_layers, "max_nodes": 6, "max_depth": 4}
    )
    lengths = "/".join(str(len(r.prompt)) for r in requests)
    return Plan(
        arms=(
            Arm("no speculation", requests, off, sequential=True),
            Arm("speculation", requests, spec(args.speculation), sequential=True),
            Arm("ngram tree", requests, spec(NGRAM_TREE, streamgen_only=True), sequential=True),
            Arm("ngram chain", requests, spec(NGRAM_CHAIN, streamgen_only=True), sequential=True),
            Arm("self-speculative", requests, spec(self_spec, streamgen_only=True),
                sequential=True),
            Arm(f"{len(mixed)} at once, no speculation", mixed,
                SystemOptions(prefix_caching=False, streamgen_only=True)),
            Arm(f"{len(mixed)} at once, adaptive ngram", mixed,
                spec(adaptive, streamgen_only=True)),
        ),
        description=f"{', '.join(n for n, _ in tasks)} of a fixed passage ({lengths}-token "
        f"prompts), one at a time, {new_tokens} new tokens each; then the same among "
        f"{num_chat} chat requests, all at once",
        metric="tok/s",
        baseline_arm="no speculation",
        notes=(
            "Speculation can beat the roofline: it checks several tokens per weight read.",
            "The peers speculate with prompt lookup (a chain) in the 'speculation' arm only.",
            f"Concurrent arms: compare '{len(mixed)} at once' adaptive vs no speculation.",
        ),
    )

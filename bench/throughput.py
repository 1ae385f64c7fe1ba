"""Throughput: N requests submitted at once, chat-like length mix, streamgen's engine
vs HF transformers `generate` in static batches of 8.

Prompt lengths (20-600) and output lengths (16-256) are drawn from a fixed
seed; prompts are random token ids (the work, not the text, is what is
measured); greedy, EOS ignored, so both systems do the same useful work.
Each system runs in its own worker process; systems alternate per repetition.
"""

from __future__ import annotations

import argparse
import random
from typing import Any

from bench.common import median, save_record
from bench.worker import WorkerProcess


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--model", default=None)
    parser.add_argument("--quick", action="store_true", help="8 short requests (harness check)")


def workload(num: int, seed: int, quick: bool) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompt_range, output_range = ((8, 40), (4, 12)) if quick else ((20, 600), (16, 256))
    prompts = [[rng.randint(100, 40000) for _ in range(rng.randint(*prompt_range))]
               for _ in range(num)]
    return prompts, [rng.randint(*output_range) for _ in range(num)]


def run(args: argparse.Namespace) -> None:
    num = 8 if args.quick else args.requests
    prompts, output_lens = workload(num, args.seed, args.quick)
    config = {"max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens,
              "kv_cache_bytes": 2 << 30}
    rows = []
    for dtype in args.dtypes.split(","):
        config["dtype"] = dtype
        workers = [WorkerProcess(s, dtype, args.threads, args.model) for s in ("streamgen", "hf")]
        results: dict[str, list[dict[str, Any]]] = {"streamgen": [], "hf": []}
        for rep in range(args.repeats):
            for worker in workers if rep % 2 == 0 else workers[::-1]:
                print(f"  {dtype} {worker.name} repetition {rep + 1}/{args.repeats}", flush=True)
                results[worker.name].append(worker.run_workload(prompts, output_lens, config))
        for worker in workers:
            worker.close()
        ours = median([r["useful_tok_s"] for r in results["streamgen"]])
        theirs = median([r["useful_tok_s"] for r in results["hf"]])
        rows.append({
            "dtype": dtype,
            "requests": num,
            "output_tokens": sum(output_lens),
            "streamgen_tok_s": ours,
            "hf_static8_tok_s": theirs,
            "ratio": ours / theirs,
            "streamgen_ttft_s": results["streamgen"][0]["ttft_s"],
            "streamgen_itl_s": results["streamgen"][0]["itl_s"],
            "hf_ttft_s": results["hf"][0]["ttft_s"],
            "preemptions": results["streamgen"][0]["preemptions"],
        })
    print(f"\nthroughput, {num} requests at once, {args.threads} threads")
    print(f"{'dtype':<10}{'streamgen tok/s':>16}{'HF static-8':>13}{'ratio':>7}"
          f"{'TTFT p50/p99 s':>17}{'ITL p50/p99 ms':>17}")
    for r in rows:
        ttft, itl = r["streamgen_ttft_s"], r["streamgen_itl_s"]
        print(f"{r['dtype']:<10}{r['streamgen_tok_s']:>16.1f}{r['hf_static8_tok_s']:>13.1f}"
              f"{r['ratio']:>7.2f}{ttft['p50']:>8.1f}/{ttft['p99']:<8.1f}"
              f"{itl['p50'] * 1e3:>8.0f}/{itl['p99'] * 1e3:<8.0f}")
    command = "python -m bench throughput" + (" --quick" if args.quick else "")
    path = save_record("throughput", {"command": command, "threads": args.threads,
                                      "repeats": args.repeats, "rows": rows})
    print(f"record: {path}")
    from bench.report import main as write_report

    write_report()

"""Batch-1 decode latency: ~100-token prompt, 128 new tokens, streamgen vs HF `generate`.

Both systems run the same weights, dtype, thread count, prompt and greedy
decoding with EOS ignored (equal work), each in its own worker process
(bench/worker.py). Systems alternate within each repetition; the table shows
medians and streamgen's ratio to HF.
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import median, save_record
from bench.roofline import decode_step_bytes, measure_read_bandwidth
from bench.worker import WorkerProcess

PROMPT = (
    "You are reviewing a short technical design. The service stores user sessions in a "
    "key-value store, replicates writes to two followers, and serves reads from any "
    "replica. Clients report that a profile update sometimes disappears for a few seconds "
    "after they save it, then shows up again. Explain the most likely cause, how to "
    "confirm it from the logs, and two ways to fix it with their trade-offs."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None, help="checkpoint dir (default model)")


def _prompt_ids(tokenizer: Any) -> list[int]:
    messages = [{"role": "user", "content": PROMPT}]
    ids: list[int] = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    return ids


def run(args: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from streamgen.model.config import ModelSpec
    from streamgen.model.loader import resolve_dtype
    from streamgen.models import default_model_path

    model_dir = args.model or str(default_model_path())
    prompt = _prompt_ids(AutoTokenizer.from_pretrained(model_dir))
    spec = ModelSpec.from_hf_config(AutoConfig.from_pretrained(model_dir))
    bandwidth = measure_read_bandwidth(args.threads)
    print(f"memory read bandwidth ({args.threads} threads): {bandwidth / 1e9:.1f} GB/s")
    rows = []
    for dtype in args.dtypes.split(","):
        workers = [
            WorkerProcess(system, dtype, args.threads, args.model) for system in ("streamgen", "hf")
        ]
        for worker in workers:
            worker.run(prompt, 8)  # warm-up
        results: dict[str, list[dict]] = {"streamgen": [], "hf": []}
        for rep in range(args.repeats):
            print(f"  {dtype} repetition {rep + 1}/{args.repeats}", flush=True)
            # Alternate which system goes first, so slow drifts hit both alike.
            for worker in workers if rep % 2 == 0 else workers[::-1]:
                results[worker.name].append(worker.run(prompt, args.new_tokens))
        for worker in workers:
            worker.close()
        mean_context = len(prompt) + args.new_tokens // 2
        step_bytes = decode_step_bytes(spec, resolve_dtype(dtype), mean_context)
        tps = [r["tok_s"] for r in results["streamgen"]]
        hf_tps = [r["tok_s"] for r in results["hf"]]
        rows.append(
            {
                "dtype": dtype,
                "prompt_tokens": len(prompt),
                "new_tokens": args.new_tokens,
                "streamgen_tok_s": median(tps),
                "streamgen_ttft_s": median([r["ttft_s"] for r in results["streamgen"]]),
                "hf_generate_tok_s": median(hf_tps),
                "ratio": median(tps) / median(hf_tps),
                "same_tokens_as_hf": results["streamgen"][0]["token_ids"]
                == results["hf"][0]["token_ids"],
                "roofline_tok_s": bandwidth / step_bytes,
                "step_mbytes": step_bytes / 1e6,
                "raw": {"streamgen": tps, "hf": hf_tps},
            }
        )
    print(f"\nbatch-1 decode, {args.threads} threads, median of {args.repeats}")
    print(
        f"{'dtype':<10}{'streamgen tok/s':>17}{'TTFT ms':>9}{'HF tok/s':>10}{'ratio':>7}"
        f"{'roofline tok/s':>16}{'of roofline':>13}"
    )
    for r in rows:
        print(
            f"{r['dtype']:<10}{r['streamgen_tok_s']:>17.1f}{r['streamgen_ttft_s'] * 1e3:>9.0f}"
            f"{r['hf_generate_tok_s']:>10.1f}{r['ratio']:>7.2f}{r['roofline_tok_s']:>16.1f}"
            f"{r['streamgen_tok_s'] / r['roofline_tok_s']:>12.0%}"
        )
    command = "python -m bench latency " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k != "scenario" and v is not None
    )
    path = save_record(
        "latency",
        {
            "command": command,
            "threads": args.threads,
            "repeats": args.repeats,
            "read_bandwidth_gb_s": bandwidth / 1e9,
            "rows": rows,
        },
    )
    print(f"record: {path}")
    from bench.report import main as write_report

    write_report()

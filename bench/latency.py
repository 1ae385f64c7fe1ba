"""Batch-1 decode latency: ~100-token prompt, 128 new tokens, streamgen vs HF `generate`.

Both systems run the same weights, dtype, thread count, prompt and greedy
decoding with EOS ignored (equal work). Systems alternate within each
repetition; the table shows medians and streamgen's ratio to HF.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from bench.common import median, save_record

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


def _time_streamgen(generator: Any, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    from streamgen import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    first = 0.0
    count = 0
    for _ in generator.stream(prompt, params):
        count += 1
        if count == 1:
            first = time.perf_counter() - start
    total = time.perf_counter() - start
    assert count == new_tokens
    return new_tokens / total, first


def _time_hf(model: Any, prompt: list[int], new_tokens: int) -> float:
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        )
    total = time.perf_counter() - start
    assert out.shape[1] - ids.shape[1] == new_tokens
    return new_tokens / total


def run(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    from streamgen import OfflineGenerator, load_model
    from streamgen.model.loader import resolve_dtype

    torch.set_num_threads(args.threads)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = resolve_dtype(dtype_name)
        loaded = load_model(args.model, dtype=dtype)
        generator = OfflineGenerator(loaded)
        hf = AutoModelForCausalLM.from_pretrained(loaded.path, dtype=dtype).eval()
        prompt = _prompt_ids(loaded.tokenizer)
        _time_streamgen(generator, prompt, 8)  # warm-up both
        _time_hf(hf, prompt, 8)
        ours, ttfts, theirs = [], [], []
        for rep in range(args.repeats):
            print(f"  {dtype_name} repetition {rep + 1}/{args.repeats}", flush=True)
            tps, ttft = _time_streamgen(generator, prompt, args.new_tokens)
            ours.append(tps)
            ttfts.append(ttft)
            theirs.append(_time_hf(hf, prompt, args.new_tokens))
        rows.append(
            {
                "dtype": dtype_name,
                "prompt_tokens": len(prompt),
                "new_tokens": args.new_tokens,
                "streamgen_tok_s": median(ours),
                "streamgen_ttft_s": median(ttfts),
                "hf_generate_tok_s": median(theirs),
                "ratio": median(ours) / median(theirs),
                "raw": {"streamgen": ours, "hf": theirs},
            }
        )
        del generator, hf, loaded
    print(f"\nbatch-1 decode, {args.threads} threads, median of {args.repeats}")
    print(f"{'dtype':<10}{'streamgen tok/s':>17}{'TTFT ms':>9}{'HF tok/s':>10}{'ratio':>7}")
    for r in rows:
        print(
            f"{r['dtype']:<10}{r['streamgen_tok_s']:>17.1f}{r['streamgen_ttft_s'] * 1e3:>9.0f}"
            f"{r['hf_generate_tok_s']:>10.1f}{r['ratio']:>7.2f}"
        )
    command = "python -m bench latency " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k != "scenario" and v is not None
    )
    path = save_record(
        "latency",
        {"command": command, "threads": args.threads, "repeats": args.repeats, "rows": rows},
    )
    print(f"record: {path}")
    from bench.report import main as write_report

    write_report()

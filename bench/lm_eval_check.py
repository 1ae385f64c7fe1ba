"""lm-evaluation-harness against `streamgen serve`, unchanged: its `local-completions`
model (loglikelihood through `echo` + `logprobs`, generation through `stop`) on two
local tasks, compared request by request with the same harness's `hf` model (HF
transformers in this process) on the same checkpoint.

    python -m bench.lm_eval_check [--lm-eval-python /path/to/venv/bin/python] [--threads 2]

lm-eval is not a dependency of streamgen (it pulls datasets, scikit-learn, ...): give the
Python of an environment that has `lm-eval` (and transformers, torch for its `hf` model).
The tasks (bench/lm_eval/*.yaml) read local JSON lines, so nothing is downloaded. The
harness finds the server's tokenizer by itself (`/tokenizer_info`, `/tokenize`,
`/detokenize`: its "remote" tokenizer backend), so no tokenizer is passed.

Arms: `streamgen serve` on the default model's HF directory, dense float32 (the
reference arm runs the same weights in transformers), and `streamgen serve` on the
default GGUF (the quantized path: its scores only). The record holds the largest
loglikelihood difference between the dense arm and HF, whether every `is_greedy` flag and
every generation agree, and each arm's metrics.
"""

from __future__ import annotations

import argparse
import datetime as dt
import glob
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import git_commit, machine, run_and_record, standalone_parser
from bench.llama_cpp_tools import simd_flags
from bench.serve import server_process

TASKS_DIR = Path(__file__).parent / "lm_eval"
TASKS = ("streamgen_mc", "streamgen_qa")
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}


def served(model: Path, threads: int, quantization: str) -> Any:
    return server_process(lambda port: [
        sys.executable, "-m", "streamgen", "serve", "--model", str(model), "--port", str(port),
        "--threads", str(threads), "--quantization", quantization, "--dtype", "float32",
        "--served-model-name", model.name, "--log-level", "warning",
    ], quiet=True)  # fmt: skip


def lm_eval(python: str, model_args: list[str], out: Path) -> tuple[dict[str, Any], str]:
    """Run the harness's CLI; its results (per task) and its log."""
    command = [
        python, "-m", "lm_eval", *model_args, "--include_path", str(TASKS_DIR),
        "--tasks", ",".join(TASKS), "--output_path", str(out), "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(
        command, env={**os.environ, **OFFLINE}, capture_output=True, text=True,
        cwd=TASKS_DIR.parent.parent,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr[-4000:]}")
    results = json.loads(Path(glob.glob(f"{out}/*/results_*.json")[0]).read_text())
    return results["results"], done.stderr


def samples(out: Path, task: str) -> dict[int, dict[str, Any]]:
    path = glob.glob(f"{out}/*/samples_{task}_*.jsonl")[0]
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {row["doc_id"]: row for row in rows}


def compare(served_out: Path, hf_out: Path) -> dict[str, Any]:
    """Request by request: loglikelihoods, greedy flags, generated texts."""
    a, b = samples(served_out, "streamgen_mc"), samples(hf_out, "streamgen_mc")
    worst, greedy_same, requests = 0.0, True, 0
    for doc in a:
        for (served_ll, served_greedy), (hf_ll, hf_greedy) in (
            (x[0], y[0]) for x, y in zip(a[doc]["resps"], b[doc]["resps"], strict=True)
        ):  # fmt: skip
            worst = max(worst, abs(float(served_ll) - float(hf_ll)))
            greedy_same &= served_greedy == hf_greedy
            requests += 1
    a, b = samples(served_out, "streamgen_qa"), samples(hf_out, "streamgen_qa")
    same = sum(a[doc]["resps"] == b[doc]["resps"] for doc in a)
    return {"loglikelihood_requests": requests, "max_abs_loglikelihood_diff": worst,
            "is_greedy_all_equal": greedy_same, "generations_equal": same,
            "generations": len(a)}  # fmt: skip


def metrics(results: dict[str, Any]) -> dict[str, float]:
    keep = ("acc,none", "acc_norm,none", "exact_match,strip")
    return {f"{task}/{key}": results[task][key] for task in TASKS for key in keep
            if key in results[task]}  # fmt: skip


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from streamgen.checkpoint import default_gguf_path, default_model_path

    hf_dir = default_model_path()
    arms: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {name: Path(tmp) / name for name in ("dense", "gguf", "hf")}
        for name, model, quantization in (("dense", hf_dir, "none"),
                                          ("gguf", default_gguf_path(), "auto")):  # fmt: skip
            async with served(model, args.threads, quantization) as url:
                model_args = ["--model", "local-completions", "--model_args",
                              f"model={model.name},base_url={url}/v1/completions,"
                              "num_concurrent=8,max_retries=1"]  # fmt: skip
                results, log = lm_eval(args.lm_eval_python, model_args, outs[name])
            arms[name] = {"metrics": metrics(results),
                          "remote_tokenizer": "remote tokenizer" in log.lower()}  # fmt: skip
        hf_args = ["--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32",
                   "--device", "cpu"]  # fmt: skip
        results, _ = lm_eval(args.lm_eval_python, hf_args, outs["hf"])
        arms["hf"] = {"metrics": metrics(results)}
        agreement = compare(outs["dense"], outs["hf"])
    version = subprocess.run(
        [args.lm_eval_python, "-c", "import importlib.metadata as m; print(m.version('lm_eval'))"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    now = dt.datetime.now(dt.timezone.utc)
    return {
        "format": 1, "scenario": "lm_eval", "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m bench.lm_eval_check " + shlex.join(sys.argv[1:]),
        "commit": git_commit(), "machine": machine(), "cpu_flags": simd_flags(),
        "lm_eval_version": version, "threads": args.threads, "arms": arms, **agreement,
    }  # fmt: skip


def render(record: dict[str, Any]) -> str:
    arms = record["arms"]
    names = {"dense": "`streamgen serve`, HF dir, dense fp32 (`local-completions`)",
             "gguf": "`streamgen serve`, default GGUF, quantized (`local-completions`)",
             "hf": "lm-eval's `hf` model (transformers), same HF dir, fp32"}  # fmt: skip
    keys = list(arms["hf"]["metrics"])
    return "\n".join([
        f"## lm_eval — {record['date']}", "",
        f"- command: `{record['command']}`",
        f"- commit: `{record['commit']}`; machine: {record['machine']}; "
        f"CPU flags: {', '.join(record['cpu_flags'])}",
        f"- lm-evaluation-harness {record['lm_eval_version']}, tasks in bench/lm_eval "
        f"(local JSON lines), {record['threads']} threads; the harness found the server's "
        f"tokenizer itself: {arms['dense']['remote_tokenizer']}",
        f"- dense arm vs `hf`, request by request: {record['loglikelihood_requests']} "
        f"loglikelihood requests, max |Δ loglikelihood| "
        f"**{record['max_abs_loglikelihood_diff']:.1e}**, every `is_greedy` equal: "
        f"{record['is_greedy_all_equal']}; generations equal: "
        f"**{record['generations_equal']} of {record['generations']}**", "",
        "| arm | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys),
        *(f"| {names[arm]} | " + " | ".join(f"{arms[arm]['metrics'].get(k, float('nan')):.3f}"
                                           for k in keys) + " |"
          for arm in ("dense", "gguf", "hf")),
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = standalone_parser("lm_eval_check", __doc__)
    parser.add_argument(
        "--lm-eval-python",
        default=sys.executable,
        help="the Python of an environment with lm-eval installed",
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    return run_and_record("lm_eval", run, render, args)


if __name__ == "__main__":
    raise SystemExit(main())

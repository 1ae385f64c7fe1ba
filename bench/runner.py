"""Runs a scenario's plan: workers per system, alternating repetitions, record, table, plots.

For each dtype every system gets its own worker process (bench/worker.py),
loaded in parallel, warmed up once, then every repetition runs every arm on
every system, the system order reversed on odd repetitions so that slow
drifts of a shared machine hit all systems alike.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench import metrics, plots, table
from bench.common import RunOptions, record_stem, save_record
from bench.roofline import MachineLimits, measure_limits, precision, workload_bound
from bench.systems import LABELS, llama_cpp_installed, precheck
from bench.worker import WorkerPool, WorkerProcess
from bench.workloads import Arm, ModelInfo

QUICK_KV_BYTES = 64 << 20


@dataclass(frozen=True)
class Plan:
    """What a scenario runs and how its table reads."""

    arms: tuple[Arm, ...]
    description: str  # one line for the report
    metric: str = "output tok/s"  # label of the tok_s column
    baseline_arm: str | None = None  # arms are also compared with this one, per system
    notes: tuple[str, ...] = ()
    throughput_plot: bool = False


Results = dict[tuple[str, str], list[dict[str, Any]]]  # (arm, system) -> runs


def _warm_arm(plan: Plan) -> Arm:
    first = plan.arms[0].requests[0]
    request = replace(first, output_len=min(4, first.output_len), arrival_s=0.0, read_delay_s=0.0)
    return Arm("warm-up", (request,), plan.arms[0].options)


def run_dtype(
    plan: Plan,
    opts: RunOptions,
    dtype: str,
    gguf: str | None,
    skipped: dict[str, str],
    pool: WorkerPool,
) -> tuple[Results, dict[tuple[str, str], str]]:
    """Every arm on every system, ``opts.repeats`` times; and the arms a system cannot run."""
    names = []
    for name in opts.systems:
        reason = precheck(name, gguf)
        if reason is None:
            names.append(name)
        else:
            skipped[name] = reason
    workers, refused = pool.acquire(names, dtype, opts.threads, opts.model, gguf)
    skipped.update(refused)
    for name, reason in skipped.items():
        print(f"skipping {name}: {reason}", flush=True)
    results: Results = {(arm.name, name): [] for arm in plan.arms for name in workers}
    unavailable: dict[tuple[str, str], str] = {}
    for worker in workers.values():
        worker.run_arm(_warm_arm(plan), lambda n: None)
    total = opts.repeats * len(plan.arms) * len(workers)
    with tqdm(total=total, desc=f"{opts.scenario} {dtype}", unit="run") as bar:
        for rep in range(opts.repeats):
            order = list(workers) if rep % 2 == 0 else list(workers)[::-1]
            for arm in plan.arms:
                for name in order:
                    key = (arm.name, name)
                    if key not in unavailable:
                        result = _run_one(workers[name], arm, f"{arm.name} / {name}")
                        if "unavailable" in result:
                            unavailable[key] = result["unavailable"]
                        else:
                            results[key].append(result)
                    bar.update()
    return results, unavailable


def _run_one(worker: WorkerProcess, arm: Arm, desc: str) -> dict[str, Any]:
    expected = sum(r.output_len for r in arm.requests)
    with tqdm(total=expected, desc=desc, unit="tok", leave=False) as tokens:
        return worker.run_arm(arm, lambda n: tokens.update(n - tokens.n))


def _rows(
    plan: Plan,
    dtype: str,
    results: Results,
    unavailable: dict[tuple[str, str], str],
    info: ModelInfo,
    limits: MachineLimits,
) -> list[dict[str, Any]]:
    """One table row per (arm, system) with medians, ratios, roofline and CDFs."""
    rows: list[dict[str, Any]] = []
    reference_arm = plan.arms[0]
    reference = results.get((reference_arm.name, "streamgen"))
    for arm in plan.arms:
        for (arm_name, system), runs in results.items():
            if arm_name != arm.name:
                continue
            row: dict[str, Any] = {
                "dtype": dtype,
                "arm": arm.name,
                "system": system,
                "label": LABELS.get(system, system),
            }
            if (arm.name, system) in unavailable:
                rows.append({**row, "unavailable": unavailable[(arm.name, system)]})
                continue
            per_run = [metrics.run_metrics(r["traces"], arm.metric_tag) for r in runs]
            row["metrics"] = metrics.combine(per_run)
            row["runs"] = per_run
            row["cdf"] = metrics.pooled_cdfs([r["traces"] for r in runs], arm.metric_tag)
            row["info"] = runs[0]["info"]
            row["roofline"] = _roofline(arm, system, dtype, info, limits)
            if (
                reference
                and _same_requests(arm, reference_arm)
                and not (arm is reference_arm and system == "streamgen")
            ):
                row["same_tokens"] = metrics.same_tokens(runs[0]["traces"], reference[0]["traces"])
            rows.append(row)
    _add_ratios(rows, plan.baseline_arm)
    return rows


def _same_requests(a: Arm, b: Arm) -> bool:
    key = lambda arm: [(r.prompt, r.output_len) for r in arm.requests]  # noqa: E731
    return key(a) == key(b)


def _roofline(
    arm: Arm,
    system: str,
    dtype: str,
    info: ModelInfo,
    limits: MachineLimits,
) -> dict[str, float]:
    counted = [r for r in arm.requests if arm.metric_tag is None or r.tag == arm.metric_tag]
    begin = min(r.arrival_s for r in counted)  # the measured span starts there too
    bound = workload_bound(
        info.spec,
        precision(system, dtype, quantized=info.quantized and system == "streamgen"),
        limits,
        [(len(r.prompt), r.output_len, r.arrival_s - begin) for r in counted],
        arm.sequential,
    )
    tokens = sum(r.output_len for r in counted)
    return {
        "tok_s": tokens / bound.seconds,
        "seconds": bound.seconds,
        "gbytes": bound.bytes / 1e9,
        "gflops": bound.flops / 1e9,
    }


def _add_ratios(rows: list[dict[str, Any]], baseline_arm: str | None) -> None:
    by_key = {(r["arm"], r["system"]): r for r in rows if "metrics" in r}
    for row in by_key.values():
        ours = by_key.get((row["arm"], "streamgen"))
        if ours is not None and row["system"] != "streamgen":
            row["streamgen_ratio"] = ours["metrics"]["tok_s"] / row["metrics"]["tok_s"]
        base = by_key.get((baseline_arm, row["system"])) if baseline_arm else None
        if base is not None and base is not row:
            row["vs_baseline"] = row["metrics"]["tok_s"] / base["metrics"]["tok_s"]


def _default_gguf(opts: RunOptions) -> str | None:
    """The default model's GGUF when llama.cpp will run on it (fetched only then)."""
    if opts.gguf or opts.model or "llamacpp" not in opts.systems or not llama_cpp_installed():
        return opts.gguf
    from streamgen.checkpoint import default_gguf_path  # kept in the default model's cache

    return str(default_gguf_path())


def _quick_sized(plan: Plan) -> Plan:
    """--quick workloads are tiny: a small KV cache allocates faster."""
    arms = tuple(
        replace(a, options=replace(a.options, kv_cache_bytes=QUICK_KV_BYTES)) for a in plan.arms
    )
    return replace(plan, arms=arms)


def run_plan(
    opts: RunOptions, build: Callable[[ModelInfo], Plan], pool: WorkerPool | None = None
) -> Path:
    """Run the scenario, print its table, write its record, plots and report; the record path.

    Workers come from ``pool`` (kept open for the caller) or from a pool of this run.
    """
    if pool is None:
        with WorkerPool() as own:
            return run_plan(opts, build, own)
    info = ModelInfo.load(opts.model)
    plan = _quick_sized(build(info)) if opts.quick else build(info)
    gguf = _default_gguf(opts)
    limits = measure_limits(opts.threads, opts.quick)
    print(f"machine limits: {limits.describe()}", flush=True)
    skipped: dict[str, str] = {}
    rows: list[dict[str, Any]] = []
    for dtype in opts.dtypes:
        results, unavailable = run_dtype(plan, opts, dtype, gguf, skipped, pool)
        rows += _rows(plan, dtype, results, unavailable, info, limits)
    record = _record(opts, plan, info, limits, skipped, rows)
    _print_summary(opts, plan, limits, rows)
    return _write_outputs(opts, plan, record)


def _record(
    opts: RunOptions,
    plan: Plan,
    info: ModelInfo,
    limits: MachineLimits,
    skipped: dict[str, str],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "format": 2,
        "scenario": opts.scenario,
        "command": opts.command,
        "description": plan.description,
        "threads": opts.threads,
        "repeats": opts.repeats,
        "quick": opts.quick,
        "model": str(info.model_dir),
        "metric": plan.metric,
        "baseline_arm": plan.baseline_arm,
        "limits": {
            "copy_gb_s": limits.copy_bandwidth / 1e9,
            "matmul_gflop_s": limits.matmul_flops / 1e9,
        },
        "notes": list(plan.notes),
        "skipped": skipped,
        "arms": [
            {
                "name": a.name,
                "requests": len(a.requests),
                "output_tokens": sum(r.output_len for r in a.requests),
                "options": a.options.to_json(),
                "sequential": a.sequential,
            }
            for a in plan.arms
        ],
        "rows": rows,
    }


def _print_summary(
    opts: RunOptions, plan: Plan, limits: MachineLimits, rows: list[dict[str, Any]]
) -> None:
    print()
    print(f"{opts.scenario}: {plan.description}")
    print(
        f"medians of {opts.repeats} repetition(s), {opts.threads} thread(s); "
        f"machine limits: {limits.describe()}"
    )
    print(table.render_text(rows, plan.baseline_arm, plan.metric))
    print(
        "roofline: the work's minimum bytes (weights per forward pass + KV reads) over the "
        "memory bandwidth, or its FLOPs over the matmul rate, whichever is slower; "
        "(share) = measured / roofline"
    )
    for note in plan.notes:
        print(f"note: {note}")


def _write_outputs(opts: RunOptions, plan: Plan, record: dict[str, Any]) -> Path:
    """Plots, then the JSON record, then (unless --no-report) RESULTS.md."""
    now = dt.datetime.now(dt.timezone.utc)
    stem = record_stem(opts.scenario, now)
    written = plots.write_plots(record, opts.out_dir / "plots", stem, plan.throughput_plot)
    record["plots"] = [str(p.relative_to(opts.out_dir)) for p in written]
    path = save_record(opts.out_dir, opts.scenario, record, now)
    print(f"record: {path}")
    for plot in written:
        print(f"plot: {plot}")
    if opts.write_report:
        from bench import report

        report.write(opts.out_dir, opts.report_path)
        print(f"report: {opts.report_path}")
    return path

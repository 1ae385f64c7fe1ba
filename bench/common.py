"""Shared benchmark plumbing: run options, machine and commit, result records."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_MD = BENCH_DIR / "RESULTS.md"


@dataclass(frozen=True, slots=True)
class RunOptions:
    """The options every scenario takes (see `python -m bench <scenario> --help`)."""

    scenario: str
    command: str
    threads: int
    dtypes: tuple[str, ...]
    repeats: int
    systems: tuple[str, ...]
    model: str | None
    gguf: str | None
    quick: bool
    seed: int
    out_dir: Path
    write_report: bool

    @classmethod
    def from_args(
        cls, args: argparse.Namespace, command: str, default_dtypes: tuple[str, ...]
    ) -> RunOptions:
        return cls(
            scenario=args.scenario,
            command=command,
            threads=args.threads,
            dtypes=_dtypes(args, default_dtypes),
            repeats=args.repeats if args.repeats is not None else (1 if args.quick else 3),
            systems=tuple(args.systems.split(",")),
            model=args.model,
            gguf=args.gguf,
            quick=args.quick,
            seed=args.seed,
            out_dir=Path(args.out_dir),
            write_report=not args.no_report,
        )

    @property
    def report_path(self) -> Path:
        """bench/RESULTS.md for the recorded results; RESULTS.md inside any other out dir."""
        if self.out_dir.resolve() == RESULTS_DIR.resolve():
            return RESULTS_MD
        return self.out_dir / "RESULTS.md"


def _dtypes(args: argparse.Namespace, default: tuple[str, ...]) -> tuple[str, ...]:
    if args.dtypes:
        return tuple(args.dtypes.split(","))
    return default[:1] if args.quick else default


def add_common_arguments(
    parser: argparse.ArgumentParser, systems: tuple[str, ...], dtypes: tuple[str, ...]
) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="threads per system (default 1: shared 2-core machines)",
    )
    parser.add_argument(
        "--dtypes",
        default=None,
        help=f"comma-separated (default {','.join(dtypes)}; the first with --quick)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repetitions, systems alternating (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--systems",
        default=",".join(systems),
        help="comma-separated: streamgen, hf, hf_cb, llamacpp",
    )
    parser.add_argument("--model", default=None, help="checkpoint dir (default model)")
    parser.add_argument(
        "--gguf", default=None, help="GGUF for llama.cpp (default: the default model's)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny workload, 1 repetition: checks the harness, not the numbers",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out-dir",
        default=str(RESULTS_DIR),
        help="where records and plots go (default bench/results)",
    )
    parser.add_argument("--no-report", action="store_true", help="do not rewrite RESULTS.md")


def median(values: list[float]) -> float:
    return statistics.median(values)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=BENCH_DIR,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=BENCH_DIR,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def record_stem(scenario: str, now: dt.datetime) -> str:
    return f"{scenario}-{now.strftime('%Y%m%dT%H%M%S')}"


def save_record(
    out_dir: Path, scenario: str, record: dict[str, Any], now: dt.datetime | None = None
) -> Path:
    """Write ``record`` (with scenario, date, commit and machine) as a new JSON file."""
    now = now or dt.datetime.now(dt.timezone.utc)
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "scenario": scenario,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine(),
        **record,
    }
    path = out_dir / f"{record_stem(scenario, now)}.json"
    path.write_text(json.dumps(record, indent=1))
    return path


def write_record(scenario: str, record: dict[str, Any], markdown: str) -> Path:
    """Save a standalone runner's record as ``results/<scenario>-<UTC stamp>.json``, print
    its markdown section (what bench.report renders into RESULTS.md) and the path."""
    import datetime as dt
    import json
    import sys

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = RESULTS_DIR / f"{scenario}-{stamp}.json"
    path.write_text(json.dumps(record, indent=1))
    print(markdown)
    print(f"record: {path}", file=sys.stderr)
    return path


def standalone_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a standalone runner (``python -m bench.<module>``), its
    module docstring as the help text."""
    return argparse.ArgumentParser(
        prog=f"python -m bench.{module}", description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip


def run_and_record(
    scenario: str,
    run: Callable[[argparse.Namespace], Awaitable[dict[str, Any]]],
    render: Callable[[dict[str, Any]], str],
    args: argparse.Namespace,
) -> int:
    """Run a standalone runner's arms and save its record (:func:`write_record`)."""
    import asyncio

    record = asyncio.run(run(args))
    write_record(scenario, record, render(record))
    return 0

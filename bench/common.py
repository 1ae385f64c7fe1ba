"""Shared benchmark plumbing: timing, medians, result records."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


def median(values: list[float]) -> float:
    return statistics.median(values)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
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


def save_record(scenario: str, record: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    record = {
        "scenario": scenario,
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "machine": machine(),
        **record,
    }
    path = RESULTS_DIR / f"{scenario}-{now.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps(record, indent=2))
    return path

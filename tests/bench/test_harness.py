"""Every scenario's --quick run works end to end on a tiny random model (not the numbers).

Each run starts real worker processes (streamgen and HF `generate`; llama.cpp
is skipped: the tiny model has no GGUF), prints the table, writes the JSON
record, the plots (when matplotlib is installed) and RESULTS.md, all into a
temporary directory: never into bench/results.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import make_hf_checkpoint, tiny_hf_config

from bench.__main__ import SCENARIOS, main
from bench.common import RESULTS_DIR, RESULTS_MD
from bench.worker import WorkerPool


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path: Path = tmp_path_factory.mktemp("tiny-bench-model")
    make_hf_checkpoint(path, tiny_hf_config("llama"))
    return path


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    """Workers shared by the scenarios (each is started once, not once per scenario)."""
    with WorkerPool() as shared:
        yield shared


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_quick_run_prints_table_and_writes_record_plots_report(
    scenario: str,
    tiny_model: Path,
    pool: WorkerPool,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    recorded = sorted(RESULTS_DIR.iterdir())
    report_before = RESULTS_MD.read_text()
    out = tmp_path / "results"
    argv = [scenario, "--quick", "--model", str(tiny_model), "--out-dir", str(out),
            "--systems", "streamgen,hf,llamacpp"]  # fmt: skip
    assert main(argv, pool) == 0

    printed = capsys.readouterr().out
    assert "TTFT ms p50 / p99" in printed and "machine limits:" in printed
    (record_path,) = out.glob(f"{scenario}-*.json")
    record = json.loads(record_path.read_text())
    assert record["scenario"] == scenario and record["quick"]
    assert record["limits"]["copy_gb_s"] > 0 and record["limits"]["matmul_gflop_s"] > 0
    assert "llamacpp" in record["skipped"]
    ours = [r for r in record["rows"] if r["system"] == "streamgen" and "metrics" in r]
    assert ours and all(r["metrics"]["tok_s"] > 0 for r in ours)
    assert all(r["roofline"]["tok_s"] > 0 for r in ours)
    if scenario != "stream":  # HF `generate` has no slow readers: "fast + slow" is n/a
        assert any(r["system"] == "hf" and "metrics" in r for r in record["rows"])

    if importlib.util.find_spec("matplotlib") is not None:
        assert record["plots"] and all((out / p).is_file() for p in record["plots"])
    report = (out / "RESULTS.md").read_text()
    assert f"## {scenario} — " in report
    assert sorted(RESULTS_DIR.iterdir()) == recorded
    assert RESULTS_MD.read_text() == report_before

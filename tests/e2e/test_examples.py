"""Every example runs and prints a real answer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

EXAMPLES = Path(__file__).parents[2] / "examples"


def test_offline_generate_example(default_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "offline_generate.py")],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "Paris" in result.stdout


def test_cli_demo_streams_an_answer(default_model_dir: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamgen", "demo", "Tell me the capital of France.",
         "--max-tokens", "24"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    assert "Paris" in result.stdout
    assert "tok/s" in result.stdout


def run_example(name: str) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    return result.stdout


def test_quickstart_example(default_model_dir: Path) -> None:
    assert "Paris" in run_example("quickstart.py")


def test_trio_example(default_model_dir: Path) -> None:
    out = run_example("trio_stream.py")
    assert "[stop] Tell me the capital of France." in out or "[length]" in out
    assert "[abort] Write a long poem" in out
    assert "'kv_blocks_used': 0" in out


def test_priorities_example(default_model_dir: Path) -> None:
    out = run_example("priorities.py")
    order = out.split("finished in order:")[1].splitlines()[0]
    assert order.index("urgent") < order.index("essay-0")
    assert "[moon, abort]" in out
    preemptions = int(out.split("preemptions:")[1].split()[0])
    assert preemptions >= 1


def test_speculative_rewrite_example(default_model_dir: Path) -> None:
    out = run_example("speculative_rewrite.py")
    assert "library" in out
    accepted = int(out.split("accepted: ")[1].split()[0])
    per_step = float(out.split("tokens per step: ")[1].split()[0])
    assert accepted > 0 and per_step > 1.0


def test_openai_server_example(default_model_dir: Path) -> None:
    pytest.importorskip("openai")
    out = run_example("openai_server.py")
    assert "Paris" in out


def test_openai_client_example(default_model_dir: Path) -> None:
    pytest.importorskip("openai")
    out = run_example("openai_client.py")
    assert "Paris" in out
    assert "Red" in out or "red" in out


def test_structured_extraction_example(default_model_dir: Path) -> None:
    out = run_example("structured_extraction.py")
    assert "order_id=4411" in out and "date='2026-11-28'" in out
    assert "label: order" in out or "label: complaint" in out


def test_openai_structured_example(default_model_dir: Path) -> None:
    pytest.importorskip("openai")
    out = run_example("openai_structured.py")
    assert "name='Paris'" in out
    date = out.split("date:")[1].split()[0]
    assert len(date) == 10 and date[4] == date[7] == "-"

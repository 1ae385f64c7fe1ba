"""`streamgen chat` in a subprocess, its stdin a pipe: an answer streamed, the history
kept, Ctrl-C (SIGINT) cancelling an answer without ending the conversation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.real_model

COMMAND = [sys.executable, "-m", "streamgen", "chat", "--temperature", "0", "--max-model-len",
           "2048"]  # fmt: skip


def read_until(proc: subprocess.Popen[bytes], marker: bytes, seen: bytearray) -> None:
    """Read the child's stdout until ``marker`` appears (a bounded wait: 300 s)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + 300
    while marker not in seen:
        assert time.monotonic() < deadline, seen.decode(errors="replace")
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, f"chat exited: {seen.decode(errors='replace')}"
        seen.extend(chunk)


def test_answers_and_ends_at_end_of_input(default_model_dir: Path) -> None:
    result = subprocess.run(
        [*COMMAND, "--max-tokens", "24"], input=b"Tell me the capital of France.\n",
        capture_output=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()
    assert b"Paris" in result.stdout


def test_ctrl_c_cancels_the_answer_not_the_conversation(default_model_dir: Path) -> None:
    proc = subprocess.Popen(
        [*COMMAND, "--max-tokens", "1500"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None
    seen = bytearray()
    read_until(proc, b"> ", seen)  # the engine is up
    proc.stdin.write(b"Write a very long story about a dragon.\n")
    proc.stdin.flush()
    answer = bytearray()
    while len(answer) < 40:  # part of the answer streamed
        chunk = os.read(proc.stdout.fileno(), 4096)
        assert chunk, "chat exited"
        answer.extend(chunk)
    proc.send_signal(signal.SIGINT)
    read_until(proc, b"[cancelled]", answer)
    read_until(proc, b"> ", answer)  # the conversation goes on
    proc.stdin.write(b"Tell me the capital of France.\n")
    proc.stdin.flush()
    later = bytearray()
    read_until(proc, b"Paris", later)
    proc.stdin.close()
    assert proc.wait(timeout=120) == 0

"""The FastAPI SSE example against a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.real_model
ROOT = Path(__file__).parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(default_model_dir: Path) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "examples.fastapi_sse:app",
         "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):  # bounded wait for start-up (model load)
            try:
                httpx.get(f"{url}/stats", timeout=1.0)
                break
            except httpx.TransportError:
                if proc.poll() is not None:
                    raise RuntimeError("uvicorn exited") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_streams_a_full_answer(server: str) -> None:
    with httpx.stream("GET", f"{server}/generate",
                      params={"prompt": "Tell me the capital of France.", "max_tokens": 24},
                      timeout=120) as response:
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert "Paris" in "".join(e["text"] for e in events)
    assert events[-1]["finish"] in ("stop", "length")


def test_client_disconnect_cancels_and_frees_blocks(server: str) -> None:
    with httpx.stream("GET", f"{server}/generate",
                      params={"prompt": "Write a very long story about a dragon.",
                              "max_tokens": 2000},
                      timeout=120) as response:
        received = 0
        for line in response.iter_lines():
            if line.startswith("data: "):
                received += 1
            if received == 5:
                break  # leaving the block closes the connection mid-stream
    for _ in range(200):  # bounded polls until the server has freed the request
        stats = httpx.get(f"{server}/stats", timeout=5).json()
        if stats["kv_blocks_used"] == 0 and stats["running"] == 0:
            break
        time.sleep(0.1)
    assert stats["kv_blocks_used"] == 0
    assert stats["running"] == stats["waiting"] == 0


def test_bad_input_is_a_400(server: str) -> None:
    response = httpx.get(f"{server}/generate", params={"prompt": "hi", "max_tokens": 0},
                         timeout=30)
    assert response.status_code == 400
    assert "max_tokens" in response.text

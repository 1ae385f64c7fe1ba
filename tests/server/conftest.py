"""A real uvicorn server on 127.0.0.1 (in a thread of this process, so tests can read the
engine's counters) serving the default model through ``standalone_app``."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("openai")
pytest.importorskip("prometheus_client")

MODEL = "smollm2"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LiveServer:
    url: str
    engine: Any
    app: Any
    loop: Any  # the server's event loop, where the engine's streams live

    def client(self, prefix: str = "") -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}{prefix}/v1", api_key="unused", max_retries=0)


def run_uvicorn(app: Any) -> Iterator[str]:
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        for _ in range(600):  # bounded wait for start-up (model load)
            if server.started or not thread.is_alive():
                break
            time.sleep(0.1)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=60)


@pytest.fixture(scope="package")
def live(default_model_dir: Path) -> Iterator[LiveServer]:
    """``openai_app`` over an engine its lifespan starts (as ``standalone_app`` does),
    keeping the loop the engine runs on so tests can run SDK calls beside HTTP ones."""
    from streamgen import Engine, EngineConfig
    from streamgen.server import openai_app

    config = EngineConfig(threads=2, max_model_len=1024, kv_cache_bytes=128 << 20)
    engine = Engine(None, config)
    loops: list[Any] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        loops.append(asyncio.get_running_loop())
        async with engine:
            yield

    import fastapi
    from starlette.applications import Starlette
    from starlette.routing import Mount

    # Apps of one engine share its event loop: one uvicorn, every app mounted in it.
    host = fastapi.FastAPI()  # an existing app a user mounts the API into
    host.get("/ping")(lambda: {"pong": "yes"})
    host.mount("/llm", openai_app(engine, model_name=MODEL))
    app = Starlette(
        routes=[
            Mount("/limited", openai_app(engine, model_name=MODEL, max_concurrency=1)),
            Mount("/host", host),
            Mount("/", openai_app(engine, model_name=MODEL, max_concurrency=8)),
        ],
        lifespan=lifespan,
    )
    for url in run_uvicorn(app):
        yield LiveServer(url, engine, app, loops[0])

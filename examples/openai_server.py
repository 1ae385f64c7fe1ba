"""The OpenAI API mounted in a FastAPI app, queried with the official `openai` client.

    python examples/openai_server.py

The app keeps its own routes (/ping) and serves the API under /llm; the engine starts
and stops with the app's lifespan. Any OpenAI client (agents, eval harnesses) can point
at http://127.0.0.1:<port>/llm/v1. Standalone: `streamgen serve --port 8000`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai
import uvicorn
from fastapi import FastAPI

from streamgen import Engine, EngineConfig
from streamgen.server import openai_app

engine = Engine(config=EngineConfig(max_model_len=2048, kv_cache_bytes=256 << 20))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with engine:
        yield


app = FastAPI(lifespan=lifespan)
app.mount("/llm", openai_app(engine, model_name="smollm2"))


@app.get("/ping")
def ping() -> dict[str, str]:
    return {"pong": "yes"}


def main() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.1)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/llm/v1", api_key="unused")
    question = [{"role": "user", "content": "Tell me the capital of France."}]
    for chunk in client.chat.completions.create(
        model="smollm2", messages=question, max_tokens=48, temperature=0, stream=True
    ):
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()
    server.should_exit = True


if __name__ == "__main__":
    main()

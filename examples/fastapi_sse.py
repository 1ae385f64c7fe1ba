"""A FastAPI app streaming tokens as server-sent events.

    uvicorn examples.fastapi_sse:app --port 8000
    curl -N "http://127.0.0.1:8000/generate?prompt=Tell+me+a+joke"

A client that disconnects mid-stream cancels its request: Starlette cancels
the response's body iterator, and the stream aborts and frees its KV blocks.
Set STREAMGEN_MODEL to a checkpoint directory to serve another model.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from fastapi.responses import StreamingResponse

from streamgen import Engine, EngineConfig, RequestError, SamplingParams


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with Engine(os.environ.get("STREAMGEN_MODEL"), EngineConfig()) as engine:
        app.state.engine = engine
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/generate")
async def generate(
    prompt: str, max_tokens: int = 128, temperature: float = 0.0
) -> StreamingResponse:
    engine: Engine = app.state.engine
    try:
        params = SamplingParams(temperature=temperature, max_tokens=max_tokens)
        stream = engine.stream([{"role": "user", "content": prompt}], params)
    except RequestError as exc:  # bad input: rejected before anything is queued
        raise HTTPException(status_code=400, detail=str(exc)) from exc

    async def events() -> AsyncIterator[str]:
        async for event in stream:
            payload = {"text": event.text, "index": event.index, "finish": event.finish_reason}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@app.get("/stats")
async def stats() -> dict:
    return app.state.engine.stats()

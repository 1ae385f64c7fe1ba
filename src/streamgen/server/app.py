"""The OpenAI-compatible ASGI app over a running :class:`~streamgen.Engine`.

>>> from streamgen.server import openai_app
>>> app.mount("/llm", openai_app(engine))  # doctest: +SKIP

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as
server-sent events or not), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus), ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (vLLM's
shapes: lm-evaluation-harness's ``local-completions`` tokenizes through them). Bad input
is a 400 in OpenAI's error shape before anything reaches the engine.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from streamgen.engine.engine import Engine
from streamgen.sampling_params import SamplingParams
from streamgen.server.errors import (
    APIError,
    BadRequest,
    ModelNotFound,
    TooManyRequests,
    Unavailable,
    from_exception,
)
from streamgen.server.generation import Choice, cancel_all, collect, until_disconnect
from streamgen.server.metrics import CONTENT_TYPE, ServerMetrics
from streamgen.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from streamgen.server.responses import ResponseMeta, token_text_of
from streamgen.server.sse import EventStreamResponse


@dataclass
class _Server:
    engine: Engine
    model_name: str
    metrics: ServerMetrics
    max_concurrency: int | None
    in_flight: int = 0


def openai_app(
    engine: Engine,
    *,
    model_name: str | None = None,
    max_concurrency: int | None = None,
    lifespan: Callable[[Starlette], Any] | None = None,
) -> Starlette:
    """An ASGI app serving the OpenAI API from ``engine`` (started by the caller, or by
    ``lifespan``), to run alone or ``mount`` in an existing app.

    ``model_name``: the id clients pass as ``model`` (default: the checkpoint's directory
    or file name); ``max_concurrency``: generation requests in flight past which the app
    answers 429 (None: no limit; the engine's queue holds the rest).
    """
    if max_concurrency is not None and (
        isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int)
        or max_concurrency < 1
    ):  # fmt: skip
        raise ValueError(f"max_concurrency must be None or >= 1, got {max_concurrency!r}")
    server = _Server(engine, model_name or "", ServerMetrics(engine), max_concurrency)

    def name() -> str:
        if not server.model_name:
            path = engine.model_path
            server.model_name = path.name if path is not None else "streamgen"
        return server.model_name

    async def chat(request: Request) -> Response:
        return await _generate(server, name(), request, ChatCompletionRequest)

    async def completions(request: Request) -> Response:
        return await _generate(server, name(), request, CompletionRequest)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(engine, name())]})

    async def health(request: Request) -> Response:
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        return _error_response(Unavailable("the engine is starting, stopped or dead"))

    async def metrics(request: Request) -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    async def tokenize(request: Request) -> Response:
        try:
            body = await _parse(request, TokenizeRequest)
            _check_model(body.model, name())
            if (body.prompt is None) == (body.messages is None):
                raise BadRequest("give exactly one of prompt and messages", param="prompt")
            if body.messages is not None:
                ids = engine.tokenize(
                    [{"role": m.role, "content": m.text()} for m in body.messages]
                )
            else:
                assert body.prompt is not None
                ids = list(
                    engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
                )
            return JSONResponse(
                {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids}
            )
        except Exception as exc:
            return _error_response(from_exception(exc))

    async def detokenize(request: Request) -> Response:
        try:
            body = await _parse(request, DetokenizeRequest)
            _check_model(body.model, name())
            bad = [t for t in body.tokens if not 0 <= t < len(engine.tokenizer)]
            if bad:
                raise BadRequest(f"token ids outside the vocabulary: {bad[:5]}", param="tokens")
            return JSONResponse({"prompt": engine.tokenizer.decode(body.tokens)})
        except Exception as exc:
            return _error_response(from_exception(exc))

    async def tokenizer_info(request: Request) -> Response:
        try:
            return JSONResponse(_tokenizer_card(engine))
        except Exception as exc:  # not started yet: 503
            return _error_response(from_exception(exc))

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_info, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.engine = engine
    return app


def standalone_app(
    model: Any = None,
    config: Any = None,
    *,
    model_name: str | None = None,
    max_concurrency: int | None = None,
) -> Starlette:
    """An app that owns its engine: started by the ASGI lifespan, closed with it
    (``streamgen serve`` runs this under uvicorn)."""
    engine = Engine(model, config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with engine:
            yield

    return openai_app(
        engine, model_name=model_name, max_concurrency=max_concurrency, lifespan=lifespan
    )


# ----- generation ----------------------------------------------------------------------


async def _generate(
    server: _Server, model_name: str, request: Request, kind: type[BaseModel]
) -> Any:  # a Response, or the event stream (an ASGI app of its own)
    engine = server.engine
    try:
        body = await _parse(request, kind)
        _check_model(body.model, model_name)
        if not engine.healthy:
            raise Unavailable("the engine is starting, stopped or dead")
        if server.max_concurrency is not None and server.in_flight >= server.max_concurrency:
            raise TooManyRequests(
                f"{server.in_flight} requests in flight (max_concurrency="
                f"{server.max_concurrency}): retry later",
                code="too_many_requests",
            )
        choices, prompt_tokens = _start_choices(server, body)
    except Exception as exc:
        return _error_response(from_exception(exc))
    server.in_flight += 1
    is_chat = isinstance(body, ChatCompletionRequest)
    meta = ResponseMeta(
        ("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex,
        int(time.time()),
        model_name,
        is_chat,
        body.logprobs is not None and body.logprobs is not False,
        prompt_tokens,
    )
    token_text = token_text_of(engine.tokenizer)

    def record(choice: Choice) -> None:
        server.metrics.record(choice.stream, len(choice.events), choice.finish_reason)

    def done() -> None:
        server.in_flight -= 1

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStreamResponse(meta, choices, token_text, include_usage, record, done)
    try:
        await until_disconnect(request.receive, choices, lambda: collect(choices, record))
    except Exception as exc:
        return _error_response(from_exception(exc))
    finally:
        done()
    return JSONResponse(meta.full_response(choices, token_text))


def _start_choices(server: _Server, body: Any) -> tuple[list[Choice], int]:
    """Every choice's stream (prompts x n): the ``n`` of a prompt are parallel samples
    (``Engine.stream_choices``: one prompt computation, distinct derived seeds). A refused
    request (bad sampling values, a prompt over the context) cancels the ones started."""
    engine = server.engine
    params: SamplingParams = body.params()
    if isinstance(body, ChatCompletionRequest):
        kwargs = body.chat_template_kwargs or {}
        prompts: list[list[int]] = [engine.tokenize(body.messages_as_dicts(), **kwargs)]
    else:
        prompts = [engine.tokenize(p) for p in body.prompts()]
    echo = isinstance(body, CompletionRequest) and body.echo
    choices: list[Choice] = []
    try:
        for ids in prompts:
            text = engine.tokenizer.decode(ids) if echo else ""
            for stream in engine.stream_choices(ids, params, body.n, body.priority):
                choices.append(Choice(len(choices), stream, ids, text))
    except BaseException:
        cancel_all(choices)
        raise
    server.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts))
    return choices, sum(len(ids) for ids in prompts)


# ----- helpers ---------------------------------------------------------------------------


async def _parse(request: Request, kind: type[Any]) -> Any:
    try:
        raw = await request.body()
        data = json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        raise from_exception(exc) from exc


def _check_model(model: str | None, served: str) -> None:
    if model is not None and model != served:
        raise ModelNotFound(model, served)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _model_card(engine: Engine, name: str) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "streamgen"}
    if engine.healthy:
        card["max_model_len"] = engine.max_model_len
    return card


def _tokenizer_card(engine: Engine) -> dict[str, Any]:
    """The tokenizer's special tokens and chat template (vLLM's ``/tokenizer_info``)."""
    tokenizer = engine.tokenizer
    card: dict[str, Any] = {
        "tokenizer_class": type(tokenizer).__name__,
        "vocab_size": len(tokenizer),
        "model_max_length": engine.max_model_len,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        card[key] = getattr(tokenizer, key, None)
    return card

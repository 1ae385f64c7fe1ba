"""The OpenAI-compatible ASGI app over a running :class:`~streamgen.Engine`.

>>> from streamgen.server import openai_app
>>> app.mount("/llm", openai_app(engine))  # doctest: +SKIP

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as
server-sent events or not), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus), ``POST /tokenize``, ``POST /detokenize``. Bad input is a 400 in OpenAI's
error shape before anything reaches the engine.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

import anyio
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from streamgen.engine.engine import Engine
from streamgen.engine.events import TokenEvent
from streamgen.sampling_params import SamplingParams
from streamgen.server import responses
from streamgen.server.errors import (
    APIError,
    BadRequest,
    ModelNotFound,
    TooManyRequests,
    Unavailable,
    from_exception,
)
from streamgen.server.generation import Choice, ChoiceEvent, cancel_all, collect, run_merged
from streamgen.server.metrics import CONTENT_TYPE, ServerMetrics
from streamgen.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)


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
            server.model_name = _default_model_name(engine)
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

    routes = [
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
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
        choices, prompt_tokens, echoes = _start_choices(server, body)
    except Exception as exc:
        return _error_response(from_exception(exc))
    server.in_flight += 1
    is_chat = isinstance(body, ChatCompletionRequest)
    meta = _ResponseMeta(
        ("chatcmpl-" if is_chat else "cmpl-") + uuid.uuid4().hex,
        int(time.time()),
        model_name,
        is_chat,
        body.logprobs is not None and body.logprobs is not False,
        prompt_tokens,
        echoes,
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _EventStreamResponse(server, meta, choices, include_usage)
    try:
        await _collect_until_disconnect(server, request, choices)
    except Exception as exc:
        return _error_response(from_exception(exc))
    finally:
        server.in_flight -= 1
    return JSONResponse(meta.full_response(choices, engine))


def _start_choices(server: _Server, body: Any) -> tuple[list[Choice], int, list[str]]:
    """Every choice's stream (prompts x n), each choice with its own seed. A refused
    request (bad sampling values, a prompt over the context) cancels the ones started."""
    engine = server.engine
    params: SamplingParams = body.params()
    seeds = body.choice_seeds()
    if isinstance(body, ChatCompletionRequest):
        kwargs = body.chat_template_kwargs or {}
        prompts: list[list[int]] = [engine.tokenize(body.messages_as_dicts(), **kwargs)]
        echoes = [""]
    else:
        prompts = [engine.tokenize(p) for p in body.prompts()]
        echoes = [engine.tokenizer.decode(p) if body.echo else "" for p in prompts]
    # The n choices of a prompt share its blocks through the prefix cache: followers
    # start once the leader's prompt is cached (not when every position is scored anyway).
    share = engine.config.enable_prefix_caching and params.prompt_logprobs is None
    choices: list[Choice] = []
    try:
        for p, ids in enumerate(prompts):
            leader = None
            for j, seed in enumerate(seeds):
                choice_params = replace(params, seed=seed)
                if leader is not None and share:

                    def start(ids: list[int] = ids, cp: SamplingParams = choice_params) -> Any:
                        return engine.stream(ids, cp, body.priority)

                    choices.append(Choice(p * len(seeds) + j, None, ids, start, leader))
                    continue
                stream = engine.stream(ids, choice_params, body.priority)
                choices.append(Choice(p * len(seeds) + j, stream, ids))
                leader = choices[-1]
    except BaseException:
        cancel_all(choices)
        raise
    server.metrics.prompt_tokens.inc(sum(len(ids) for ids in prompts))
    return choices, sum(len(ids) for ids in prompts), echoes


async def _collect_until_disconnect(
    server: _Server, request: Request, choices: list[Choice]
) -> None:
    """Run the choices to their end; a client that disconnects first cancels them."""

    def done(choice: Choice) -> None:
        server.metrics.record(choice.stream, len(choice.events), choice.finish_reason)

    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            cancel_all(choices)
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        await collect(choices, done)
        tg.cancel_scope.cancel()


@dataclass(frozen=True)
class _ResponseMeta:
    id: str
    created: int
    model: str
    chat: bool
    logprobs: bool
    prompt_tokens: int
    echoes: list[str]

    def _echo(self, choice: Choice, n_per_prompt: int) -> str:
        return self.echoes[choice.index // n_per_prompt] if self.echoes else ""

    def full_response(self, choices: list[Choice], engine: Engine) -> dict[str, Any]:
        token_text = _token_text(engine)
        completion_tokens = sum(len(c.events) for c in choices)
        per_prompt = max(1, len(choices) // max(1, len(self.echoes)))
        out = []
        for c in choices:
            reason = responses.finish_reason(c.finish_reason)
            if self.chat:
                out.append({
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": responses.chat_logprobs(c.events, token_text)
                    if self.logprobs else None,
                    "finish_reason": reason,
                })  # fmt: skip
            else:
                echo = self._echo(c, per_prompt)
                logprobs = None
                if self.logprobs and echo:
                    scored = c.stream.prompt_logprobs if c.stream else None
                    logprobs = responses.echoed_logprobs(
                        c.prompt_ids, scored, c.events, token_text
                    )
                elif self.logprobs:
                    logprobs = responses.completion_logprobs(c.events, token_text, 0)
                out.append({
                    "index": c.index,
                    "text": echo + c.text,
                    "logprobs": logprobs,
                    "finish_reason": reason,
                })  # fmt: skip
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": out,
            "usage": responses.usage(self.prompt_tokens, completion_tokens),
        }

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        payload = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }
        return b"data: " + json.dumps(payload).encode() + b"\n\n"


class _EventStreamResponse:
    """Server-sent events of a streamed request, written straight to the ASGI ``send``
    (so a slow client holds back only its own request), with a disconnect watcher that
    cancels every choice the moment the client goes away."""

    def __init__(
        self, server: _Server, meta: _ResponseMeta, choices: list[Choice], include_usage: bool
    ) -> None:
        self.server, self.meta, self.choices, self.include_usage = (
            server,
            meta,
            choices,
            include_usage,
        )
        self.token_text = _token_text(server.engine)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")
                ],
            })  # fmt: skip
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    cancel_all(self.choices)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                await self._write(send)
                tg.cancel_scope.cancel()
        finally:
            cancel_all(self.choices)
            self.server.in_flight -= 1

    async def _write(self, send: Send) -> None:
        meta = self.meta

        async def body(data: bytes) -> None:
            await send({"type": "http.response.body", "body": data, "more_body": True})

        per_prompt = max(1, len(self.choices) // max(1, len(meta.echoes)))
        for c in self.choices:  # the first chunk of each choice: the role (chat), the echo
            if meta.chat:
                delta = {"role": "assistant", "content": ""}
                await body(
                    meta.chunk(
                        [
                            {
                                "index": c.index,
                                "delta": delta,
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                )
            elif meta._echo(c, per_prompt) and not meta.logprobs:  # else with the first token
                echo = meta._echo(c, per_prompt)
                await body(
                    meta.chunk(
                        [{"index": c.index, "text": echo, "logprobs": None, "finish_reason": None}]
                    )
                )
        offsets = {c.index: len(meta._echo(c, per_prompt)) for c in self.choices}
        failure: list[BaseException] = []

        async def on_item(item: ChoiceEvent) -> None:
            c = item.choice
            if item.error is not None:
                failure.append(item.error)
                return
            if item.event is None:
                self.server.metrics.record(c.stream, len(c.events), c.finish_reason)
                if c.finish_reason not in ("stop", "length"):
                    failure.append(Unavailable("the request was aborted: the engine stopped"))
                return
            echo = meta._echo(c, per_prompt)
            if echo and meta.logprobs and item.event.index == 0:  # the prompt's logprobs came
                scored = c.stream.prompt_logprobs if c.stream else None
                lp = responses.echoed_logprobs(c.prompt_ids, scored, [], self.token_text)
                choice = {"index": c.index, "text": echo, "logprobs": lp, "finish_reason": None}
                await body(meta.chunk([choice]))
                offsets[c.index] = sum(len(t) for t in lp["tokens"])
            await body(self._token_chunk(c, item.event, offsets))

        await run_merged(self.choices, on_item)
        if failure:
            await body(b"data: " + json.dumps(from_exception(failure[0]).body()).encode() + b"\n\n")
        elif self.include_usage:
            completion_tokens = sum(len(c.events) for c in self.choices)
            await body(meta.chunk([], usage=responses.usage(meta.prompt_tokens, completion_tokens)))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    def _token_chunk(self, c: Choice, event: TokenEvent, offsets: dict[int, int]) -> bytes:
        meta, reason = self.meta, responses.finish_reason(event.finish_reason)
        if meta.chat:
            logprobs = responses.chat_logprobs([event], self.token_text) if meta.logprobs else None
            choice = {
                "index": c.index,
                "delta": {"content": event.text},
                "logprobs": logprobs,
                "finish_reason": reason,
            }
        else:
            logprobs = (
                responses.completion_logprobs([event], self.token_text, offsets[c.index])
                if meta.logprobs else None
            )  # fmt: skip
            offsets[c.index] += len(event.text)
            choice = {
                "index": c.index,
                "text": event.text,
                "logprobs": logprobs,
                "finish_reason": reason,
            }
        return meta.chunk([choice])


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


def _default_model_name(engine: Engine) -> str:
    from pathlib import Path

    loaded = getattr(engine, "_loaded", None)
    path = getattr(loaded, "path", None)
    if path is None:
        arg = getattr(engine, "_model_arg", None)
        path = arg if isinstance(arg, str | Path) else None
    return Path(path).name if path is not None else "streamgen"


def _model_card(engine: Engine, name: str) -> dict[str, Any]:
    card: dict[str, Any] = {"id": name, "object": "model", "created": 0, "owned_by": "streamgen"}
    if engine.healthy:
        card["max_model_len"] = engine.max_model_len
    return card


def _token_text(engine: Engine) -> Callable[[int], str]:
    tokenizer = engine.tokenizer

    def text(token_id: int) -> str:
        return str(tokenizer.decode([token_id]))

    return text

"""Engine: the async front of streamgen.

>>> async with Engine() as engine:  # doctest: +SKIP
...     async for event in engine.stream("Tell me a joke."):
...         print(event.text, end="")
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from streamgen.checkpoint.loader import LoadedModel, load_model
from streamgen.engine.assembly import build_core, engine_stats
from streamgen.engine.config import EngineConfig
from streamgen.engine.core import EngineCore, StepEvents
from streamgen.engine.delivery import current_loop, loop_scheduler
from streamgen.engine.events import Abort, Credit, SetPriority, Shutdown, StreamEnd, StreamError
from streamgen.engine.stream import RequestStream, SubmitOnce
from streamgen.engine.validation import check_chat_messages, check_priority, check_prompt_type
from streamgen.errors import (
    ConfigError,
    EngineDeadError,
    EngineNotStartedError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    InvalidStructuredOutputError,
    RequestError,
    WrongEventLoopError,
)
from streamgen.sampling_params import SamplingParams, choice_seed
from streamgen.scheduler import Request
from streamgen.structured.compiler import GrammarCompiler

Prompt = str | Sequence[int] | Sequence[dict[str, str]]
LONG_PROMPT_CHARS = 4096  # longer text prompts are tokenized off the event loop


@dataclass(frozen=True, slots=True)
class Completion:
    """What :meth:`Engine.generate` returns."""

    text: str
    token_ids: list[int]
    finish_reason: str | None


class Engine:
    """An in-process inference engine: continuous batching on a background thread,
    token streams on the event loop (asyncio or trio).

    Use ``async with Engine(...) as engine`` or ``await engine.start()`` /
    ``await engine.aclose()``. ``model`` is a checkpoint directory, an already
    loaded model, or None for the default SmolLM2-135M-Instruct.
    """

    def __init__(
        self, model: str | Path | LoadedModel | None = None, config: EngineConfig | None = None
    ) -> None:
        if model is not None and not isinstance(model, str | Path | LoadedModel):
            raise ConfigError(
                f"model must be a checkpoint directory or GGUF file path, a LoadedModel or "
                f"None (the default model), got {type(model).__name__} {model!r:.80}"
            )
        if config is not None and not isinstance(config, EngineConfig):
            raise ConfigError(
                f"config must be an EngineConfig, got {type(config).__name__}"
                + (" (use EngineConfig(**values))" if isinstance(config, dict) else "")
            )
        self.config = config or EngineConfig()
        self._model_arg = model
        self._core: EngineCore | None = None
        self._loaded: LoadedModel | None = None
        self._senders: dict[str, MemoryObjectSendStream[Any]] = {}
        self._ids = itertools.count()
        self._closed = False
        self._loop: object | None = None
        self._compiler: GrammarCompiler | None = None

    # ----- lifecycle -----------------------------------------------------------------
    async def start(self) -> Engine:
        if self._core is not None:
            return self
        schedule_on_loop = loop_scheduler()
        self._loop = current_loop()

        def deliver(events: StepEvents) -> None:
            schedule_on_loop(self._dispatch, events)

        # Loading, KV allocation and CUDA-graph capture stay off the event loop.
        self._core = await anyio.to_thread.run_sync(self._build_core, deliver)
        self._core.start()
        return self

    def _build_core(self, deliver: Callable[[StepEvents], None]) -> EngineCore:
        self._loaded = loaded = self._load()
        return build_core(loaded, self.config, self.max_model_len, deliver)

    def _load(self) -> LoadedModel:
        import torch

        if self.config.threads is not None:
            torch.set_num_threads(self.config.threads)
        if isinstance(self._model_arg, LoadedModel):
            if self.config.threads is not None:
                from streamgen.model.quantized import kernel_context

                # A model loaded with other threads: its kernel pool follows this engine.
                context = kernel_context(self._model_arg.model)
                if context is not None:
                    context.resize(self.config.threads)
            return self._model_arg
        return load_model(
            self._model_arg,
            dtype=self.config.dtype,
            quantization=self.config.quantization,
            threads=self.config.threads,
            activation_bits=self.config.activation_bits,
        )

    async def aclose(self) -> None:
        """Stop the core; open streams end with ``finish_reason == "abort"``."""
        if self._core is None or self._closed:
            return
        self._closed = True
        self._core.send(Shutdown())
        await anyio.to_thread.run_sync(self._core.join, 30.0)
        for rid in list(self._senders):
            self._dispatch({rid: [StreamEnd("abort")]})

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ----- requests ------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        if self._loaded is None:
            raise EngineNotStartedError("max_model_len is known once the engine has started")
        return self.config.max_model_len or self._loaded.spec.max_position_embeddings

    @property
    def model_path(self) -> Path | None:
        """The checkpoint directory or GGUF file served (once started: the resolved
        path, the default model's included); None before start for the default model."""
        if self._loaded is not None:
            return Path(self._loaded.path)
        arg = self._model_arg
        return Path(arg) if isinstance(arg, str | Path) else None

    @property
    def tokenizer(self) -> Any:
        if self._loaded is None:
            raise EngineNotStartedError("the tokenizer is loaded when the engine starts")
        return self._loaded.tokenizer

    def stream(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        *,
        buffer: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> RequestStream:
        """Start a request and return its token stream (an async iterator and handle).

        ``prompt``: text, chat messages (``[{"role": ..., "content": ...}]``,
        rendered with the model's chat template, to which ``chat_template_kwargs`` go:
        ``{"enable_thinking": False}`` for Qwen3) or token ids. Invalid input
        raises a :class:`~streamgen.RequestError` before anything is queued.
        """
        return self._start(prompt, params, 1, priority, buffer, chat_template_kwargs)[0]

    def stream_choices(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        n: int = 2,
        priority: int = 0,
        *,
        buffer: int | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestStream]:
        """``n`` samples of one prompt (parallel sampling), each its own stream.

        The prompt is computed once: the other samples fork the first one's KV blocks
        when all of the prompt but its last token is computed, and each then computes
        that token and samples on its own (the partial last block is copied on write,
        every full block stays shared). With ``params.seed`` set, sample ``i`` uses the
        seed :func:`~streamgen.sampling_params.choice_seed` derives (sample 0 the seed
        itself), so the samples differ yet reproduce; unseeded, each draws from the
        engine's generator. A request asking for ``prompt_logprobs`` is not forked (each
        sample scores the prompt). Each stream is cancelled, reprioritised and
        backpressured on its own.

        >>> params = SamplingParams(temperature=0.8, seed=1)
        >>> a, b = engine.stream_choices("Once upon a time", params)  # doctest: +SKIP
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RequestError(f"n must be an int >= 1, got {n!r}")
        return self._start(prompt, params, n, priority, buffer, chat_template_kwargs)

    def _start(
        self,
        prompt: Prompt,
        params: SamplingParams | None,
        n: int,
        priority: int,
        buffer: int | None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[RequestStream]:
        """Check everything, then create ``n`` requests of one prompt (the first is the
        one the others fork off) and their streams, and submit them together."""
        core = self._require_loop()
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(f"params must be SamplingParams, got {type(params).__name__}")
        check_priority(priority)
        capacity = buffer if buffer is not None else self.config.stream_buffer
        if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
            raise RequestError(f"buffer must be a positive int, got {capacity!r}")
        vocab = self._loaded.spec.vocab_size if self._loaded else 0
        bad_stops = [t for t in params.stop_token_ids if t >= vocab]
        if bad_stops:
            raise InvalidSamplingParamsError(
                f"stop_token_ids {bad_stops[:5]} are outside the vocabulary [0, {vocab})"
            )
        bad_bias = [t for t, _ in params.logit_bias_pairs if t >= vocab]
        if bad_bias:
            raise InvalidSamplingParamsError(
                f"logit_bias token ids {bad_bias[:5]} are outside the vocabulary [0, {vocab})"
            )
        check_prompt_type(prompt)
        ids = [f"req-{next(self._ids)}" for _ in range(n)]
        channels = [anyio.create_memory_object_stream[Any](capacity + 2) for _ in range(n)]
        choice_params = [replace(params, seed=choice_seed(params.seed, i)) for i in range(n)]

        def make_requests(token_ids: list[int]) -> list[Request]:
            requests = [
                Request(rid, token_ids, p, priority, credit=capacity,
                        fork_parent=ids[0] if i else None)
                for i, (rid, p) in enumerate(zip(ids, choice_params, strict=True))
            ]  # fmt: skip
            requests[0].check_prompt(
                self.max_model_len, core.runner.num_blocks, self.config.block_size
            )
            return requests

        def submit(requests: list[Request]) -> None:
            members = []
            for request, (send, _), stream in zip(requests, channels, streams, strict=True):
                if stream.status == "cancelled":  # cancelled before its deferred submission
                    continue
                self._senders[request.request_id] = send
                members.append((request, stream.metrics))
            core.submit_group(members)

        constraint = params.structured_outputs
        compiler = self._grammar_compiler() if constraint is not None else None
        if compiler is not None:
            assert constraint is not None
            compiler.check(constraint)  # a bad schema / regex / grammar raises here

        def attach_grammars(requests: list[Request]) -> None:  # may compile: off the loop
            if compiler is not None:
                assert constraint is not None
                for request in requests:
                    request.grammar = compiler.state(constraint)

        long_text = isinstance(prompt, str) and len(prompt) > LONG_PROMPT_CHARS
        if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, Mapping):
            raise RequestError(
                f"chat_template_kwargs must be a mapping, got {type(chat_template_kwargs).__name__}"
            )
        ready = None if long_text else make_requests(self._tokenize(prompt, chat_template_kwargs))
        if ready is not None and (
            compiler is None or compiler.is_compiled(constraint)  # type: ignore[arg-type]
        ):
            attach_grammars(ready)  # copies of a compiled matcher: microseconds
            streams = [
                RequestStream(rid, receive, self)
                for rid, (_, receive) in zip(ids, channels, strict=True)
            ]
            submit(ready)
            return streams

        async def submit_later() -> None:
            """Tokenize a long text and compile a new constraint in a worker thread: the
            request is queued when both are ready, and no other request waits."""
            requests = ready
            if requests is None:
                requests = make_requests(await anyio.to_thread.run_sync(self._tokenize, prompt))
            await anyio.to_thread.run_sync(attach_grammars, requests)
            submit(requests)

        once = SubmitOnce(submit_later)  # whichever stream is read first submits all
        streams = [
            RequestStream(rid, receive, self, once)
            for rid, (_, receive) in zip(ids, channels, strict=True)
        ]
        return streams

    def _grammar_compiler(self) -> GrammarCompiler:
        """The engine's structured-output compiler, made on first use (it needs the
        model's tokenizer)."""
        if self._compiler is None:
            tokenizer = self._loaded.tokenizer if self._loaded is not None else None
            if tokenizer is None:
                raise InvalidStructuredOutputError(
                    "structured outputs need the model's tokenizer (this engine has none)"
                )
            assert self._loaded is not None
            self._compiler = GrammarCompiler(tokenizer, self._loaded.spec.eos_token_ids)
        return self._compiler

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
    ) -> Completion:
        """The whole completion at once."""
        stream = self.stream(prompt, params, priority, chat_template_kwargs=chat_template_kwargs)
        texts, token_ids = [], []
        async for event in stream:
            texts.append(event.text)
            token_ids.append(event.token_id)
        return Completion("".join(texts), token_ids, stream.finish_reason)

    def tokenize(self, prompt: Prompt, **chat_template_kwargs: Any) -> list[int]:
        """The token ids :meth:`stream` would run for ``prompt`` (text as is, chat
        messages through the model's chat template with the generation prompt, token ids
        checked against the vocabulary). ``chat_template_kwargs`` go to the template
        (``enable_thinking=False``, ...).

        Raises :class:`~streamgen.InvalidPromptError` for a prompt :meth:`stream` refuses.

        >>> engine.tokenize([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        [1, 4093, 198, ...]
        """
        self._require_core()
        check_prompt_type(prompt)
        return self._tokenize(prompt, chat_template_kwargs)

    def stats(self) -> dict[str, Any]:
        """Queue sizes, KV blocks and preemptions, read without locking (approximate).

        Raises EngineNotStartedError before ``start()``."""
        return engine_stats(self._require_core(), healthy=self.healthy)

    @property
    def healthy(self) -> bool:
        return self._core is not None and self._core.is_alive and not self._closed

    # ----- internals -----------------------------------------------------------------
    def _require_core(self) -> EngineCore:
        if self._core is None:
            raise EngineNotStartedError(
                "the engine is not started: use `async with Engine(...) as engine` or "
                "`await engine.start()` first"
            )
        if self._core.error is not None or self._closed:
            raise EngineDeadError("the engine is not running")
        return self._core

    def _require_loop(self) -> EngineCore:
        core = self._require_core()
        if current_loop() is not self._loop:
            raise WrongEventLoopError(
                "the engine was started on another event loop (or is called from a thread): "
                "its streams live there; call it from the loop that started it"
            )
        return core

    def _tokenize(
        self, prompt: Prompt, chat_template_kwargs: Mapping[str, Any] | None = None
    ) -> list[int]:
        tokenizer = self.tokenizer
        vocab = self._loaded.spec.vocab_size if self._loaded else 0
        if isinstance(prompt, str):
            token_ids = list(tokenizer.encode(prompt))
        elif prompt and all(isinstance(m, Mapping) for m in prompt):
            check_chat_messages(prompt)
            try:
                token_ids = list(
                    tokenizer.apply_chat_template(
                        list(prompt),
                        add_generation_prompt=True,
                        tokenize=True,
                        return_dict=False,
                        **(chat_template_kwargs or {}),
                    )
                )
            except Exception as exc:  # the template's own errors (jinja raise_exception, ...)
                raise InvalidPromptError(f"the chat template failed: {exc}") from exc
        elif all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            token_ids = list(prompt)
            bad = [t for t in token_ids if not 0 <= t < vocab]
            if bad:
                raise InvalidPromptError(
                    f"token ids outside the vocabulary [0, {vocab}): {bad[:5]}"
                )
        else:
            raise InvalidPromptError("prompt must be text, chat messages or a list of token ids")
        if not token_ids:
            raise InvalidPromptError("the prompt is empty")
        return token_ids

    def _dispatch(self, events: StepEvents) -> None:
        """On the event loop: push one step's events into the streams (never blocks)."""
        for rid, items in events.items():
            send = self._senders.get(rid)
            if send is None:
                continue
            for item in items:
                try:
                    send.send_nowait(item)
                except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                    break  # the consumer is gone; its abort is already on the way
                final = isinstance(item, StreamEnd | StreamError) or item.finish_reason is not None
                if final:
                    send.close()
                    del self._senders[rid]
                    break

    def _abort(self, request_id: str) -> None:
        if self._core is not None:
            self._core.send(Abort(request_id))

    def _credit(self, request_id: str, num_tokens: int) -> None:
        if self._core is not None:
            self._core.send(Credit(request_id, num_tokens))

    def _set_priority(self, request_id: str, priority: int) -> None:
        if self._core is not None:
            self._core.send(SetPriority(request_id, priority))

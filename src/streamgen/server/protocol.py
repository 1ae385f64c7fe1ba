"""The OpenAI request bodies streamgen serves, as pydantic models, and their translation
into :class:`~streamgen.SamplingParams`.

Field names and defaults follow the OpenAI API (``openai`` package's
``CompletionCreateParams`` / ``ChatCompletionCreateParams``); streamgen's own extras
(``priority``, ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``,
``min_tokens``, and ``structured_outputs``: vLLM's newer field, ``{"json" | "regex" |
"choice" | "grammar" | "json_object": ...}``) sit in the same body, as vLLM accepts
them; ``response_format`` (``json_object``, ``json_schema``) is OpenAI's own. Unknown
fields are ignored
(clients send newer fields than any server knows). Range checks are left to
``SamplingParams``, so the HTTP API and the SDK refuse the same values with the same
messages.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from streamgen.errors import InvalidStructuredOutputError
from streamgen.sampling_params import MAX_LOGPROBS, SamplingParams
from streamgen.server.errors import BadRequest
from streamgen.structured import StructuredOutputs

MAX_CHOICES = 16


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        """The message's text (content parts of type "text" joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadRequest(
                    f"message content part of type {part.get('type')!r} is not supported "
                    "(only text)",
                    param="messages",
                )
            parts.append(part["text"])
        return "".join(parts)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> StructuredOutputs | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.json_schema is None:
            raise BadRequest(
                "response_format of type json_schema needs a json_schema",
                param="response_format",
            )
        schema = self.json_schema.schema_
        # OpenAI: a json_schema without a schema is any JSON object
        return StructuredOutputs(json=schema) if schema is not None else (
            StructuredOutputs(json_object=True)
        )


class StructuredOutputsField(BaseModel):
    """vLLM's ``structured_outputs`` body field: one of its keys."""

    model_config = ConfigDict(extra="forbid")
    json_: dict[str, Any] | str | bool | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def constraint(self) -> StructuredOutputs:
        return StructuredOutputs(
            json=self.json_, regex=self.regex, choice=self.choice, grammar=self.grammar,
            json_object=bool(self.json_object),
        )  # fmt: skip


class _Sampling(BaseModel):
    """The fields chat and completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # streamgen / vLLM extras
    priority: int = 0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsField | None = None

    def constraint(self) -> StructuredOutputs | None:
        """What the output must match: ``response_format`` or ``structured_outputs``."""
        if self.response_format is not None and self.structured_outputs is not None:
            raise BadRequest(
                "give response_format or structured_outputs, not both", param="response_format"
            )
        param = "structured_outputs" if self.structured_outputs is not None else "response_format"
        try:
            if self.structured_outputs is not None:
                return self.structured_outputs.constraint()
            return self.response_format.constraint() if self.response_format else None
        except InvalidStructuredOutputError as exc:
            raise BadRequest(str(exc), param=param) from exc

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """The request's SamplingParams (``n`` choices of it: ``Engine.stream_choices``)."""
        if not 1 <= self.n <= MAX_CHOICES:
            raise BadRequest(f"n must be in [1, {MAX_CHOICES}], got {self.n}", param="n")
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise BadRequest(
                f"top_logprobs / logprobs must be in [0, {MAX_LOGPROBS}], got {logprobs}",
                param="logprobs",
            )
        values: dict[str, Any] = {
            "max_tokens": max_tokens,
            "stop": self.stop or (),
            "seed": self.seed,
            "logprobs": logprobs,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "logit_bias": self._bias(),
            "structured_outputs": self.constraint(),
        }
        optional = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
        }
        values |= {k: v for k, v in optional.items() if v is not None}
        return SamplingParams(**values)

    def _bias(self) -> list[tuple[int, float]]:
        """OpenAI's ``{"token id": bias}`` (JSON keys are strings) as pairs."""
        pairs = []
        for key, bias in (self.logit_bias or {}).items():
            try:
                pairs.append((int(key), bias))
            except ValueError:
                raise BadRequest(
                    f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
                ) from None
        return pairs


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def messages_as_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs=true", param="top_logprobs")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens or self.max_tokens
        return self.sampling_params(max_tokens, logprobs)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # the OpenAI default for completions
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the request: text or token ids, one or several."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise BadRequest("prompt must not be empty", param="prompt")
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def params(self) -> SamplingParams:
        if self.suffix:
            raise BadRequest("suffix is not supported", param="suffix")
        params = self.sampling_params(self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:  # the prompt's logprobs too
            return replace(params, prompt_logprobs=self.logprobs)
        return params


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]

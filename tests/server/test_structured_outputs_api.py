"""Structured outputs over HTTP with the official ``openai`` client: ``response_format``
(``json_schema`` from a pydantic model through ``chat.completions.parse``, and
``json_object``) and vLLM's ``structured_outputs`` extra (regex, choice, grammar), streamed
and not; a bad schema is a 400 naming ``response_format`` and the engine keeps serving."""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest
from conftest import MODEL, LiveServer
from pydantic import BaseModel, Field

pytestmark = pytest.mark.real_model


class City(BaseModel):
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=40)


ASK = [{"role": "user", "content": "Describe Paris as JSON."}]


def test_parse_fills_a_pydantic_model(live: LiveServer) -> None:
    completion = live.client().chat.completions.parse(
        model=MODEL, messages=ASK, response_format=City, temperature=0, max_tokens=120
    )
    message = completion.choices[0].message
    assert isinstance(message.parsed, City), message.content
    assert completion.choices[0].finish_reason == "stop"


def test_json_object_and_json_schema_streamed_and_not(live: LiveServer) -> None:
    client = live.client()
    schema = City.model_json_schema()
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema,
                                                  "strict": True}}  # fmt: skip
    whole = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, temperature=1.0, seed=3, max_tokens=120,
    )  # fmt: skip
    jsonschema.validate(json.loads(whole.choices[0].message.content or ""), schema)
    streamed = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format=fmt, temperature=1.0, seed=3, max_tokens=120,
        stream=True,
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content
    anything = client.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"}, max_tokens=300,
        temperature=0,
    )  # fmt: skip
    assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)


def test_structured_outputs_extra_on_completions(live: LiveServer) -> None:
    client = live.client()
    date = client.completions.create(
        model=MODEL, prompt="The Eiffel tower was finished on", max_tokens=20,
        extra_body={"structured_outputs": {"regex": " [0-9]{4}-[0-9]{2}-[0-9]{2}"}},
    )  # fmt: skip
    assert re.fullmatch(" [0-9]{4}-[0-9]{2}-[0-9]{2}", date.choices[0].text)
    pick = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, n=2, temperature=1.0,
        extra_body={"structured_outputs": {"choice": [" Paris", " Lyon"]}},
    )  # fmt: skip
    assert all(c.text in (" Paris", " Lyon") for c in pick.choices)
    grammar = 'start: " " WORD ", " WORD\nWORD: /[a-z]{2,8}/'
    words = client.completions.create(
        model=MODEL, prompt="Two fruits:", max_tokens=12,
        extra_body={"structured_outputs": {"grammar": grammar}},
    )  # fmt: skip
    assert re.fullmatch(" [a-z]{2,8}, [a-z]{2,8}", words.choices[0].text)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objec"}}}}, "response_format"),  # noqa: E501
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"structured_outputs": {"regex": "a(b"}}, "response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"nonsense": 1}}, "structured_outputs.nonsense"),
        ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "text"}},
         "response_format"),
    ],
)
def test_bad_constraints_are_400s(live: LiveServer, body: dict, param: str) -> None:
    body = {"model": MODEL, "messages": ASK, "max_tokens": 4, **body}
    response = httpx.post(f"{live.url}/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert httpx.get(f"{live.url}/health").status_code == 200

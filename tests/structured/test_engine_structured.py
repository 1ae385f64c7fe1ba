"""Structured outputs through the engine, on the real default model: every output
parses and validates (jsonschema) at temperature 0 and 1; regexes and choices match
exactly; constrained requests in a batch with unconstrained ones, under speculation
(n-gram, self-speculative and a draft model) and under preemption (recompute, swap)
give the same tokens as alone / without; bad constraints are refused at the call."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import jsonschema
import pytest

from streamgen import (
    Engine,
    EngineConfig,
    InvalidStructuredOutputError,
    SamplingParams,
    SpeculationConfig,
    StructuredOutputs,
)

pytestmark = pytest.mark.anyio

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat, required and optional keys": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "email": {"type": "string", "maxLength": 24},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "nested objects": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 16},
            "location": {
                "type": "object",
                "properties": {
                    "lat": {"type": "integer", "minimum": -90, "maximum": 90},
                    "lon": {"type": "integer", "minimum": -180, "maximum": 180},
                },
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
        },
        "required": ["city", "location"],
        "additionalProperties": False,
    },
    "arrays with bounds, enums": {
        "type": "object",
        "properties": {
            "colors": {
                "type": "array",
                "items": {"enum": ["red", "green", "blue"]},
                "minItems": 1,
                "maxItems": 3,
            },
            "size": {"enum": ["S", "M", "L"]},
        },
        "required": ["colors", "size"],
        "additionalProperties": False,
    },
    "strings with patterns, bounded numbers": {
        "type": "object",
        "properties": {
            "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
            "code": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
            "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 10},
        },
        "required": ["date", "code", "score"],
        "additionalProperties": False,
    },
}
QUESTION = "Describe a person, a place, a T-shirt and an event as JSON."
CONFIG = EngineConfig(threads=2, max_model_len=1024, kv_cache_bytes=64 << 20)


def chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def params(constraint: StructuredOutputs, temperature: float = 0.0, seed: int = 0,
           max_tokens: int = 160) -> SamplingParams:  # fmt: skip
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=max_tokens,
                          structured_outputs=constraint)  # fmt: skip


async def run_all(engine: Engine, jobs: list[tuple[Any, SamplingParams]]) -> list[Any]:
    """Every job at once (one batch); (text, token ids, finish reason) each."""
    results: list[Any] = [None] * len(jobs)

    async def one(i: int, prompt: Any, p: SamplingParams) -> None:
        stream = engine.stream(prompt, p)
        events = [e async for e in stream]
        results[i] = ("".join(e.text for e in events), [e.token_id for e in events],
                      stream.finish_reason)  # fmt: skip

    async with anyio.create_task_group() as tg:
        for i, (prompt, p) in enumerate(jobs):
            tg.start_soon(one, i, prompt, p)
    return results


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_every_output_parses_and_validates(default_model_dir: Path) -> None:
    jobs = [(chat(QUESTION), params(StructuredOutputs(json=schema), t, seed))
            for schema in SCHEMAS.values() for t, seed in ((0.0, 0), (1.0, 1), (1.0, 2))]
    jobs.append((chat(QUESTION), params(StructuredOutputs(json_object=True), 1.0, 3, 400)))
    async with Engine(None, CONFIG) as engine:
        results = await run_all(engine, jobs)
    for (text, _, reason), (_, p) in zip(results, jobs, strict=True):
        assert reason == "stop", text
        value = json.loads(text)
        constraint = p.structured_outputs
        assert constraint is not None
        schema = json.loads(constraint.json) if constraint.json else {"type": "object"}
        jsonschema.validate(value, schema)


async def test_regexes_and_choices_match_exactly(default_model_dir: Path) -> None:
    regexes = [r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r"(yes|no), because [a-z ]{5,30}\.",
               r"[A-Z][a-z]{1,10} [A-Z][a-z]{1,10}"]  # fmt: skip
    choices = [("Paris", "London", "Rome"), ("positive", "negative", "neutral")]
    jobs = [(chat("When was the Eiffel tower finished?"), params(StructuredOutputs(regex=r), t, 5))
            for r in regexes for t in (0.0, 1.0)]  # fmt: skip
    jobs += [(chat("What is the capital of France?"), params(StructuredOutputs(choice=c), t, 6))
             for c in choices for t in (0.0, 1.0)]  # fmt: skip
    grammar = 'start: "The answer is " NUMBER "."\nNUMBER: /[0-9]{1,3}/'
    jobs.append((chat("What is 12 + 30?"), params(StructuredOutputs(grammar=grammar))))
    async with Engine(None, CONFIG) as engine:
        results = await run_all(engine, jobs)
    for (text, _, reason), (_, p) in zip(results, jobs, strict=True):
        constraint = p.structured_outputs
        assert constraint is not None and reason == "stop", (constraint, text)
        if constraint.regex is not None:
            assert re.fullmatch(constraint.regex, text), (constraint.regex, text)
        elif constraint.choice is not None:
            assert text in constraint.choice
        else:
            assert re.fullmatch(r"The answer is [0-9]{1,3}\.", text), text


async def test_in_a_batch_each_output_equals_the_request_alone(default_model_dir: Path) -> None:
    schema = StructuredOutputs(json=SCHEMAS["nested objects"])
    jobs = [
        (chat("Where is Lyon?"), params(schema)),
        (chat("Tell me the capital of France."), SamplingParams(temperature=0, max_tokens=40)),
        (chat("Pick a colour."), params(StructuredOutputs(choice=["red", "blue"]), 1.0, 9)),
        (chat("Where is Oslo?"), params(schema, 1.0, 4)),
        (chat("A date, please."), params(StructuredOutputs(regex=r"[0-9]{2}/[0-9]{2}"), 1.0, 2)),
    ]
    async with Engine(None, CONFIG) as engine:
        alone = [(await run_all(engine, [job]))[0] for job in jobs]
        together = await run_all(engine, jobs)
    assert [r[1] for r in together] == [r[1] for r in alone]


SPECULATION = {
    "ngram": lambda model_dir: SpeculationConfig(method="ngram", adaptive=False),
    "self": lambda model_dir: SpeculationConfig(method="self", adaptive=False),
    "draft_model": lambda model_dir: SpeculationConfig(
        method="draft_model", draft_model=str(model_dir), adaptive=False
    ),
}


@pytest.mark.parametrize("method", list(SPECULATION))
async def test_speculation_keeps_constrained_greedy_outputs(
    default_model_dir: Path, method: str
) -> None:
    """Greedy under constraints: the same tokens with speculation as without; drafts
    were verified (and some cut by the grammar, or rejected)."""
    schema = StructuredOutputs(json=SCHEMAS["flat, required and optional keys"])
    jobs = [(chat("Describe Ada Lovelace as JSON: name and age."), params(schema)),
            (chat('Repeat: {"name": "Bob", "age": 41}'), params(schema)),
            (chat("When was the Eiffel tower finished?"),
             params(StructuredOutputs(regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}")))]  # fmt: skip
    async with Engine(None, CONFIG) as engine:
        plain = await run_all(engine, jobs)
    config = replace(CONFIG, speculation=SPECULATION[method](default_model_dir))
    async with Engine(None, config) as engine:
        speculative = await run_all(engine, jobs)
        spec = engine.stats()["speculation"]
    assert [r[1] for r in speculative] == [r[1] for r in plain]
    assert spec["draft_tokens"] > 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
async def test_preemption_keeps_constrained_outputs(default_model_dir: Path, mode: str) -> None:
    """A KV pool too small for all at once: requests are preempted (by recompute or
    swap) mid-structure, and each output is still the one it gives alone."""
    schema = StructuredOutputs(json=SCHEMAS["arrays with bounds, enums"])
    jobs = [(chat(f"T-shirt number {i}, as JSON."), params(schema, 1.0, i, 120))
            for i in range(6)]  # fmt: skip
    small = EngineConfig(threads=2, max_model_len=192, num_kv_blocks=12, block_size=16,
                         preemption_mode=mode, max_num_seqs=6, num_host_blocks=64)  # fmt: skip
    async with Engine(None, small) as engine:
        alone = [(await run_all(engine, [job]))[0] for job in jobs]
        together = await run_all(engine, jobs)
        preemptions = engine.stats()["preemptions"]
    assert preemptions > 0
    assert [r[1] for r in together] == [r[1] for r in alone]


async def test_max_tokens_inside_a_structure_is_length(default_model_dir: Path) -> None:
    async with Engine(None, CONFIG) as engine:
        [(text, tokens, reason)] = await run_all(
            engine, [(chat(QUESTION), params(StructuredOutputs(json_object=True), max_tokens=5))]
        )
    assert reason == "length" and len(tokens) == 5 and text.startswith("{")


async def test_bad_constraints_are_refused_at_the_call(default_model_dir: Path) -> None:
    bad = [StructuredOutputs(regex="a(b"), StructuredOutputs(grammar="start: nothing_here"),
           StructuredOutputs(json={"type": "objec"})]  # fmt: skip
    async with Engine(None, CONFIG) as engine:
        for constraint in bad:
            with pytest.raises(InvalidStructuredOutputError):
                engine.stream("Hi", params(constraint))
        stats = engine.stats()
        assert stats["running"] == stats["waiting"] == 0
        ok = await run_all(engine, [("Hi", params(StructuredOutputs(choice=["a", "b"])))])
    assert ok[0][0] in ("a", "b")

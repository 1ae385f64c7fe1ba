"""StructuredOutputs: one constraint, canonical and hashable; every malformed one a
typed error naming the problem, at construction or (what llguidance refuses) at the
compiler's check."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from streamgen import InvalidStructuredOutputError, SamplingParams, StructuredOutputs
from streamgen.errors import InvalidSamplingParamsError, RequestError


class Person(BaseModel):
    name: str
    age: int


def test_a_schema_is_stored_as_json_text_in_its_own_key_order() -> None:
    a = StructuredOutputs(json={"type": "object", "properties": {"b": {}, "a": {}}})
    b = StructuredOutputs(json='{"type": "object", "properties": {"b": {}, "a": {}}}')
    assert a == b and hash(a) == hash(b)
    assert a.json == '{"type":"object","properties":{"b":{},"a":{}}}'
    assert StructuredOutputs(json=Person).json == StructuredOutputs(
        json=Person.model_json_schema()
    ).json
    assert StructuredOutputs(choice=["x", "y"]).choice == ("x", "y")
    assert SamplingParams(structured_outputs=a).structured_outputs is a


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"regex": "a", "choice": ["a"]}, "exactly one"),
        ({"json": "{nope"}, "not valid JSON"),
        ({"json": 3}, "JSON schema"),
        ({"json": {"x": float("nan")}}, "not JSON"),
        ({"regex": ""}, "non-empty str"),
        ({"grammar": 5}, "non-empty str"),
        ({"choice": "yes"}, "list of strings"),
        ({"choice": []}, "one or more"),
        ({"choice": ["a", ""]}, "one or more"),
        ({"json_object": "yes"}, "must be a bool"),
    ],
)
def test_malformed_constraints_are_typed_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidStructuredOutputError, match=message) as info:
        StructuredOutputs(**kwargs)
    assert isinstance(info.value, InvalidSamplingParamsError | RequestError)


def test_sampling_params_takes_only_a_structured_outputs() -> None:
    with pytest.raises(InvalidSamplingParamsError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": {}})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("constraint", "message"),
    [
        (StructuredOutputs(regex="a(b"), "unclosed group"),
        (StructuredOutputs(grammar="start: foo"), "unknown name"),
        (StructuredOutputs(json={"type": "objec"}), "objec"),
        (StructuredOutputs(json={"type": "string", "pattern": "(["}), "unclosed character"),
    ],
)
def test_what_llguidance_refuses_is_a_typed_error_naming_it(
    compiler: Any, constraint: StructuredOutputs, message: str
) -> None:
    with pytest.raises(InvalidStructuredOutputError, match=message):
        compiler.check(constraint)


def test_one_compile_per_constraint(compiler: Any, tokenizer: Any) -> None:
    constraint = StructuredOutputs(regex="[a-c]{3}")
    before = compiler.num_compiles
    first, second = compiler.state(constraint), compiler.state(constraint)
    assert compiler.num_compiles == before + 1 and compiler.is_compiled(constraint)
    assert first.matcher is not second.matcher  # each request its own state
    first.advance(tokenizer.convert_tokens_to_ids("a"))
    assert (first.mask() != second.mask()).any()  # advancing one leaves the other as it was


def test_the_offline_generator_refuses_constraints(tmp_path: Any) -> None:
    """It has no tokenizer to compile against: a typed error, not an unconstrained run."""
    from helpers import make_hf_checkpoint, tiny_hf_config

    from streamgen import ConfigError, KVCacheConfig, OfflineGenerator, load_model

    make_hf_checkpoint(tmp_path, tiny_hf_config("llama"))
    generator = OfflineGenerator(load_model(tmp_path, load_tokenizer=False), KVCacheConfig(16))
    constrained = SamplingParams(structured_outputs=StructuredOutputs(regex="a"))
    with pytest.raises(ConfigError, match="structured outputs"):
        generator.generate([[1, 2]], constrained)

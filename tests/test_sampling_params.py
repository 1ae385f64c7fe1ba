"""SamplingParams: validation, normalization, greedy detection."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest

from streamgen.errors import InvalidSamplingParamsError, RequestError
from streamgen.sampling_params import SamplingParams

BAD_VALUES = [
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1.0"),
    ("temperature", True),
    ("temperature", None),
    ("top_k", -2),
    ("top_k", 1.5),
    ("top_k", True),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("min_p", math.inf),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.nan),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("presence_penalty", math.nan),
    ("frequency_penalty", 3.0),
    ("frequency_penalty", -math.inf),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 2.0),
    ("min_tokens", -1),
    ("min_tokens", 1.0),
    ("stop", ""),
    ("stop", ["ok", ""]),
    ("stop", [1]),
    ("stop", None),
    ("stop", {"a"}),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", "12"),
    ("stop_token_ids", 3),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", 2.0),
    ("seed", 1.5),
    ("seed", "7"),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_raises_naming_field_and_value(field: str, value: object) -> None:
    with pytest.raises(InvalidSamplingParamsError) as excinfo:
        SamplingParams(**{field: value})  # type: ignore[arg-type]
    message = str(excinfo.value)
    assert message.startswith(field)
    assert repr(value) in message
    # Users catch it as a request error, or as a plain ValueError.
    assert isinstance(excinfo.value, RequestError)
    assert isinstance(excinfo.value, ValueError)


def test_min_tokens_above_max_tokens_rejected() -> None:
    with pytest.raises(InvalidSamplingParamsError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
    assert SamplingParams(max_tokens=3, min_tokens=3).min_tokens == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0.0},
        {"temperature": 2},
        {"top_k": 1},
        {"top_k": 0},
        {"top_k": -1},
        {"top_p": 1e-6},
        {"top_p": 1},
        {"min_p": 0},
        {"min_p": 1.0},
        {"repetition_penalty": 1e-3},
        {"presence_penalty": -2.0, "frequency_penalty": 2.0},
        {"max_tokens": 1, "min_tokens": 1},
        {"max_tokens": None, "min_tokens": 100},
        {"logprobs": 0},
        {"logprobs": 20},
        {"seed": -3},
        {"seed": 2**80},
        {"ignore_eos": True},
        {"stop": ["a", "bc"], "stop_token_ids": [0, 7]},
    ],
)
def test_good_values_accepted(kwargs: dict[str, object]) -> None:
    params = SamplingParams(**kwargs)  # type: ignore[arg-type]
    for name, value in kwargs.items():
        got = getattr(params, name)
        if name == "top_k" and value == -1:
            assert got == 0
        elif isinstance(value, list):
            assert got == tuple(value)
        else:
            assert got == value


def test_defaults() -> None:
    params = SamplingParams()
    assert params.temperature == 1.0
    assert params.top_k == 0
    assert params.top_p == 1.0
    assert params.min_p == 0.0
    assert params.repetition_penalty == 1.0
    assert params.presence_penalty == params.frequency_penalty == 0.0
    assert params.max_tokens is None
    assert params.min_tokens == 0
    assert params.stop == ()
    assert params.stop_token_ids == ()
    assert params.ignore_eos is False
    assert params.logprobs is None
    assert params.seed is None
    assert not params.is_greedy


def test_numbers_are_normalized_to_builtin_types() -> None:
    numpy_values: dict[str, Any] = {
        "top_p": np.float32(0.5),
        "top_k": np.int64(4),
        "seed": np.int32(3),
    }
    params = SamplingParams(temperature=1, **numpy_values)
    assert type(params.temperature) is float
    assert type(params.top_p) is float and params.top_p == 0.5
    assert type(params.top_k) is int and params.top_k == 4
    assert type(params.seed) is int and params.seed == 3


def test_stop_normalization() -> None:
    assert SamplingParams(stop="\n").stop == ("\n",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop=("x",)).stop == ("x",)
    assert SamplingParams(stop=[]).stop == ()
    assert SamplingParams(stop_token_ids=[5, 2]).stop_token_ids == (5, 2)
    assert SamplingParams(stop_token_ids=range(3)).stop_token_ids == (0, 1, 2)
    # Normalized forms compare and hash equal.
    a, b = (
        SamplingParams(stop="a", stop_token_ids=[1]),
        SamplingParams(stop=["a"], stop_token_ids=(1,)),
    )
    assert a == b and hash(a) == hash(b)


def test_stop_list_is_copied() -> None:
    stops = ["a"]
    params = SamplingParams(stop=stops)
    stops.append("b")
    assert params.stop == ("a",)


@pytest.mark.parametrize(
    ("temperature", "greedy"),
    [(0.0, True), (1e-6, True), (1e-5, False), (0.3, False), (5.0, False)],
)
def test_is_greedy(temperature: float, greedy: bool) -> None:
    assert SamplingParams(temperature=temperature).is_greedy is greedy


def test_frozen() -> None:
    params = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = 0.5  # type: ignore[misc]

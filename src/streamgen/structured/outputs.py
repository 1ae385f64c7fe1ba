"""What a request's output must match: a JSON schema, any JSON object, a regular
expression, a context-free grammar (Lark, as llguidance reads it) or one of a few strings.

Invariants: a :class:`StructuredOutputs` that exists names exactly one constraint, in a
canonical form (a schema as compact JSON text; choices as a tuple), so equal
constraints compare and hash equal and share one compiled grammar (a schema keeps its
key order, which is the order properties are generated in). Whether the
constraint compiles (a valid regex, a grammar whose rules exist, a schema llguidance
supports) is checked when a request is submitted (:class:`GrammarCompiler`), where
llguidance's message is raised as :class:`InvalidStructuredOutputError`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from streamgen.errors import InvalidStructuredOutputError

KINDS = ("json", "json_object", "regex", "grammar", "choice")


@dataclass(frozen=True, slots=True, repr=False)
class StructuredOutputs:
    """One constraint on a request's output (vLLM's ``structured_outputs`` names).

    Attributes:
        json: A JSON schema: a mapping, its JSON text, or a pydantic model class (its
            ``model_json_schema()``). Stored as compact JSON text, key order kept.
        json_object: Any JSON object (``response_format={"type": "json_object"}``).
        regex: The whole output matches this regular expression.
        grammar: A context-free grammar in Lark syntax (llguidance's dialect, which also
            embeds ``%json`` schemas and regexes).
        choice: The output is exactly one of these strings.

    The output ends when the constraint is complete and nothing more can follow (or
    when the model picks EOS where the constraint allows it); ``max_tokens`` reached
    first ends it unfinished with ``finish_reason="length"``.

    Example:
        >>> StructuredOutputs(json={"type": "object", "properties": {"a": {"type": "integer"}}})
        StructuredOutputs(json='{"type":"object","properties":{"a":{"type":"integer"}}}')
        >>> StructuredOutputs(choice=["yes", "no"]).choice
        ('yes', 'no')
        >>> StructuredOutputs(regex="a+", choice=["a"])
        Traceback (most recent call last):
        ...
        streamgen.errors.InvalidStructuredOutputError: give exactly one of json, json_object, regex, grammar, choice (got regex, choice)
    """  # noqa: E501

    json: Any = None
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: Sequence[str] | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidStructuredOutputError(
                f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})"
            )
        if not isinstance(self.json_object, bool):
            raise InvalidStructuredOutputError(
                f"json_object must be a bool, got {self.json_object!r:.40}"
            )
        if self.json is not None:
            object.__setattr__(self, "json", _canonical_schema(self.json))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise InvalidStructuredOutputError(
                    f"{name} must be a non-empty str, got {value!r:.40}"
                )
        if self.choice is not None:
            choice = self.choice
            if isinstance(choice, str | bytes) or not isinstance(choice, Sequence):
                raise InvalidStructuredOutputError(
                    f"choice must be a list of strings, got {choice!r:.40}"
                )
            if not choice or not all(isinstance(c, str) and c for c in choice):
                raise InvalidStructuredOutputError(
                    f"choice must hold one or more non-empty strings, got {choice!r:.60}"
                )
            object.__setattr__(self, "choice", tuple(choice))

    def __repr__(self) -> str:
        return f"StructuredOutputs({self.kind}={getattr(self, self.kind)!r})"

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))


def _canonical_schema(schema: Any) -> str:
    """A schema as compact JSON text (a pydantic model class: its JSON schema)."""
    model_json_schema = getattr(schema, "model_json_schema", None)
    if isinstance(schema, type) and callable(model_json_schema):
        schema = model_json_schema()
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise InvalidStructuredOutputError(f"json: not valid JSON: {exc}") from exc
    if isinstance(schema, bool):
        return json.dumps(schema)
    if not isinstance(schema, Mapping):
        raise InvalidStructuredOutputError(
            "json must be a JSON schema (a mapping, its JSON text or a pydantic model "
            f"class), got {type(schema).__name__}"
        )
    try:
        # Key order is kept: a schema's property order is the order they are generated in.
        return json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidStructuredOutputError(f"json: the schema is not JSON: {exc}") from exc

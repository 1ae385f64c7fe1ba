"""Structured outputs: constraints on what a request generates (JSON schema, any JSON
object, regex, Lark grammar, choice), compiled with llguidance and applied as token masks
at every sampled row (plain decodes and draft-tree rows alike)."""

from streamgen.structured.outputs import StructuredOutputs

__all__ = ["StructuredOutputs"]

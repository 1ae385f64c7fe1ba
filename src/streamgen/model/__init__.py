"""Llama-family model runtime: config, weights, forward over a flat token batch."""

from streamgen.model.config import ModelSpec
from streamgen.model.loader import LoadedModel, load_model

__all__ = ["LoadedModel", "ModelSpec", "load_model"]

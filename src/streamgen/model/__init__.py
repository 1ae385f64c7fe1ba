"""The Llama-family model runtime: its description and its forward over a flat token batch.

Reading checkpoints (HF directories, GGUF files, the default model) lives in
:mod:`streamgen.checkpoint`; this package only computes.
"""

from streamgen.model.config import ModelSpec

__all__ = ["ModelSpec"]

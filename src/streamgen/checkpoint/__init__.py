"""Reading model checkpoints: HF safetensors directories, GGUF files, the default model.

This package ends where computing starts: it produces a :class:`~streamgen.model.ModelSpec`
and weights for :mod:`streamgen.model`, and knows nothing of steps.

Importing this package is cheap (standard library only); ``transformers``,
``gguf`` and ``numpy`` are imported only when a conversion actually runs.

Example:
    >>> from streamgen.checkpoint import default_model_path
    >>> model_dir = default_model_path()  # doctest: +SKIP
"""

from streamgen.checkpoint.cache import streamgen_home
from streamgen.checkpoint.default_model import (
    DEFAULT_MODEL_NAME,
    default_gguf_path,
    default_model_path,
)

__all__ = ["DEFAULT_MODEL_NAME", "default_gguf_path", "default_model_path", "streamgen_home"]

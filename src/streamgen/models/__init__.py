"""Model checkpoints on local disk: the default model and its cache.

Importing this package is cheap (standard library only); ``transformers``,
``gguf`` and ``numpy`` are imported only when a conversion actually runs.

Example:
    >>> from streamgen.models import default_model_path
    >>> model_dir = default_model_path()  # doctest: +SKIP
"""

from streamgen.models.cache import streamgen_home
from streamgen.models.default_model import DEFAULT_MODEL_NAME, default_model_path

__all__ = ["DEFAULT_MODEL_NAME", "default_model_path", "streamgen_home"]

"""streamgen: an in-process LLM inference SDK.

>>> from streamgen import load_model, OfflineGenerator, SamplingParams  # doctest: +SKIP
>>> gen = OfflineGenerator(load_model())  # the default SmolLM2-135M-Instruct
>>> gen.generate([[1, 504, 3]], SamplingParams(temperature=0, max_tokens=16))
"""

from streamgen.errors import (
    CapacityError,
    ConfigError,
    EngineDeadError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    MissingTensorError,
    ModelCacheError,
    ModelLoadError,
    RequestError,
    StreamgenError,
    UnsupportedModelError,
)
from streamgen.model import LoadedModel, ModelSpec, load_model
from streamgen.offline import OfflineGenerator
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "CapacityError",
    "ConfigError",
    "EngineDeadError",
    "InvalidPromptError",
    "InvalidSamplingParamsError",
    "KVCacheConfig",
    "LoadedModel",
    "MissingTensorError",
    "ModelCacheError",
    "ModelLoadError",
    "ModelSpec",
    "OfflineGenerator",
    "RequestError",
    "SamplingParams",
    "StreamgenError",
    "UnsupportedModelError",
    "__version__",
    "load_model",
]

"""streamgen: an in-process LLM inference SDK.

>>> from streamgen import Engine, SamplingParams  # doctest: +SKIP
>>> async with Engine() as engine:  # the default SmolLM2-135M-Instruct
...     async for event in engine.stream("Hello!", SamplingParams(max_tokens=16)):
...         print(event.text, end="")
"""

from streamgen.checkpoint.loader import LoadedModel, load_model
from streamgen.engine import (
    Completion,
    Engine,
    EngineConfig,
    RequestMetrics,
    RequestStream,
    TokenEvent,
)
from streamgen.errors import (
    CapacityError,
    ConfigError,
    EngineDeadError,
    EngineNotStartedError,
    InvalidPromptError,
    InvalidSamplingParamsError,
    InvalidStructuredOutputError,
    MissingTensorError,
    ModelCacheError,
    ModelLoadError,
    RequestError,
    StreamgenError,
    UnsupportedModelError,
    WrongEventLoopError,
)
from streamgen.model import ModelSpec
from streamgen.offline import OfflineGenerator
from streamgen.runner.kv_cache import KVCacheConfig
from streamgen.sampling_params import SamplingParams
from streamgen.spec.config import SpeculationConfig
from streamgen.spec.metrics import SpeculationMetrics
from streamgen.structured import StructuredOutputs

__version__ = "0.1.0"

__all__ = [
    "CapacityError",
    "Completion",
    "ConfigError",
    "Engine",
    "EngineConfig",
    "EngineDeadError",
    "EngineNotStartedError",
    "InvalidPromptError",
    "InvalidSamplingParamsError",
    "InvalidStructuredOutputError",
    "KVCacheConfig",
    "LoadedModel",
    "MissingTensorError",
    "ModelCacheError",
    "ModelLoadError",
    "ModelSpec",
    "OfflineGenerator",
    "RequestError",
    "RequestMetrics",
    "RequestStream",
    "SamplingParams",
    "SpeculationConfig",
    "SpeculationMetrics",
    "StreamgenError",
    "StructuredOutputs",
    "TokenEvent",
    "UnsupportedModelError",
    "WrongEventLoopError",
    "__version__",
    "load_model",
]

"""The async engine: `Engine`, `EngineConfig`, `RequestStream`, `TokenEvent`."""

from streamgen.engine.config import EngineConfig
from streamgen.engine.engine import Completion, Engine
from streamgen.engine.events import TokenEvent
from streamgen.engine.metrics import RequestMetrics
from streamgen.engine.stream import RequestStream

__all__ = ["Completion", "Engine", "EngineConfig", "RequestMetrics", "RequestStream", "TokenEvent"]

"""The async engine: `Engine`, `EngineConfig`, `RequestStream`, `TokenEvent`."""

from streamgen.engine.config import EngineConfig
from streamgen.engine.engine import Completion, Engine
from streamgen.engine.events import TokenEvent
from streamgen.engine.stream import RequestMetrics, RequestStream

__all__ = ["Completion", "Engine", "EngineConfig", "RequestMetrics", "RequestStream", "TokenEvent"]

"""Iteration-level (continuous-batching) scheduler: pure Python, no tensors.

Every request catches ``num_computed_tokens`` up to its token count; prefill,
chunked prefill, prefix-cache hits and decode are one rule.
"""

from streamgen.scheduler.config import PreemptionMode, SchedulerConfig
from streamgen.scheduler.output import SchedulerOutput, SchedulerStats, TokenEvent
from streamgen.scheduler.request import (
    UNLIMITED_CREDIT,
    FinishReason,
    Request,
    RequestStatus,
)
from streamgen.scheduler.scheduler import Scheduler

__all__ = [
    "UNLIMITED_CREDIT",
    "FinishReason",
    "PreemptionMode",
    "Request",
    "RequestStatus",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SchedulerStats",
    "TokenEvent",
]

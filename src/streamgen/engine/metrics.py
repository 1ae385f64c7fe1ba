"""Per-request timings and the engine's throughput counter."""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

from streamgen.spec.metrics import SpeculationMetrics


@dataclass(slots=True)
class RequestMetrics:
    """Timings of one request, in seconds (``time.perf_counter`` clock).

    ``scheduled_at`` is set by the engine's core thread when the request first
    runs (``queue_time`` = the wait before that); ``first_token_at`` and
    ``token_times`` when the consumer receives tokens.

    Example:
        >>> m = RequestMetrics(submitted_at=1.0, scheduled_at=1.5, first_token_at=2.0,
        ...                    token_times=[2.0, 2.25, 2.75])
        >>> m.queue_time, m.ttft, m.inter_token_latencies
        (0.5, 1.0, [0.25, 0.5])
    """

    submitted_at: float = field(default_factory=time.perf_counter)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    token_times: list[float] = field(default_factory=list)
    # Updated by the engine's core thread while the request speculates.
    speculation: SpeculationMetrics = field(default_factory=SpeculationMetrics)

    @property
    def queue_time(self) -> float | None:
        """Time from submission until the request first ran."""
        return None if self.scheduled_at is None else self.scheduled_at - self.submitted_at

    @property
    def ttft(self) -> float | None:
        """Time to first token (as the consumer received it)."""
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def inter_token_latencies(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in itertools.pairwise(t)]


@dataclass(slots=True)
class ThroughputMeter:
    """Generated tokens per second over a sliding window of recent steps.

    Example:
        >>> meter = ThroughputMeter(window=10.0)
        >>> meter.add(100.0, 5); meter.add(101.0, 5); meter.add(102.0, 10)
        >>> meter.total_tokens, meter.tokens_per_second(now=102.0)
        (20, 10.0)
    """

    window: float = 10.0
    total_tokens: int = 0
    _steps: deque[tuple[float, int]] = field(default_factory=deque)

    def add(self, when: float, num_tokens: int) -> None:
        self.total_tokens += num_tokens
        self._steps.append((when, num_tokens))
        while self._steps and self._steps[0][0] < when - self.window:
            self._steps.popleft()

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens of the steps in the window after the first, over the time they took."""
        now = time.perf_counter() if now is None else now
        steps = [s for s in list(self._steps) if s[0] >= now - self.window]
        if len(steps) < 2:
            return 0.0
        span = steps[-1][0] - steps[0][0]
        return sum(n for _, n in steps[1:]) / span if span > 0 else 0.0

"""What every system under test implements, and the per-request trace it returns.

A system loads its model once (in its own worker process, bench/worker.py).
For each arm it opens a :class:`Session` (a fresh engine, KV cache or batch
manager, so no state crosses arms or repetitions) and runs requests in it.
Times are ``time.perf_counter`` seconds from the start of :meth:`Session.run`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from bench.workloads import Request, SystemOptions

Progress = Callable[[int], None]
"""Called with the number of tokens just produced (drives the progress bar)."""


class Unavailable(Exception):
    """This system cannot run this arm or at all; the message says why."""


@dataclass(slots=True)
class Trace:
    """When one request was submitted and when each of its tokens arrived."""

    submitted_s: float
    tag: str = ""
    token_times_s: list[float] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)

    def add(self, time_s: float, token_id: int) -> None:
        self.token_times_s.append(time_s)
        self.token_ids.append(int(token_id))

    def shifted(self, offset_s: float) -> Trace:
        """The same trace with every time moved by ``offset_s``."""
        return Trace(
            self.submitted_s + offset_s,
            self.tag,
            [t + offset_s for t in self.token_times_s],
            list(self.token_ids),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "submitted_s": self.submitted_s,
            "tag": self.tag,
            "token_times_s": self.token_times_s,
            "token_ids": self.token_ids,
        }


class Session(Protocol):
    """One arm's run of a system: fresh state, closed after the arm."""

    def run(self, requests: Sequence[Request], progress: Progress) -> list[Trace]: ...

    def info(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class System(Protocol):
    """A loaded model behind one inference stack."""

    def session(self, options: SystemOptions) -> Session: ...


def sleep_until(start: float, offset_s: float) -> None:
    """Block until ``offset_s`` seconds after ``start`` (a perf_counter value)."""
    delay = start + offset_s - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def in_arrival_order(requests: Sequence[Request]) -> list[int]:
    """Indices of ``requests`` sorted by arrival time (stable)."""
    return sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)


def refuse_slow_readers(requests: Sequence[Request], system: str) -> None:
    """Systems without per-stream delivery cannot model a slow consumer."""
    if any(r.read_delay_s for r in requests):
        raise Unavailable(f"not available: {system} has no per-stream backpressure")

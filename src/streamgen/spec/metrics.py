"""Speculation counters, per request and per engine (torch-free)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class SpeculationMetrics:
    """How speculation went for a request (``stream.metrics.speculation``) or
    for the whole engine (``engine.stats()["speculation"]``).

    Attributes:
        draft_tokens: Draft tree nodes proposed and verified.
        accepted_tokens: Draft tokens accepted.
        verify_steps: Steps that verified a (non-empty) tree.
        draft_seconds: Time spent drafting (engine totals only).
        verify_seconds: Time of the steps that verified trees (engine totals only).

    Example:
        >>> m = SpeculationMetrics(draft_tokens=10, accepted_tokens=6, verify_steps=3)
        >>> m.acceptance_rate, m.mean_accepted_length
        (0.6, 3.0)
    """

    draft_tokens: int = 0
    accepted_tokens: int = 0
    verify_steps: int = 0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted draft tokens over proposed draft tokens (0 when none)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verification step (accepted drafts + the one extra)."""
        if not self.verify_steps:
            return 0.0
        return (self.accepted_tokens + self.verify_steps) / self.verify_steps

    def record(self, num_drafts: int, num_accepted: int) -> None:
        self.draft_tokens += num_drafts
        self.accepted_tokens += num_accepted
        self.verify_steps += 1

    def as_dict(self) -> dict[str, float]:
        return {
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "verify_steps": self.verify_steps,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "draft_seconds": self.draft_seconds,
            "verify_seconds": self.verify_seconds,
        }

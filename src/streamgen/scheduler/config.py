"""Scheduler configuration: one frozen object, validated once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from streamgen.errors import ConfigError

PreemptionMode = Literal["recompute", "swap"]


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """How much work one step may hold and how memory pressure is relieved.

    Attributes:
        max_num_batched_tokens: Token budget of one step (prefill chunks and
            decodes together).
        max_num_seqs: Most requests holding a running slot at once.
        long_prefill_chunk: Most new tokens one request may take in a step
            (``None``: only the step budget limits it). Keeps one long prompt
            from taking the whole budget while others decode.
        preemption_mode: ``"recompute"`` frees a preempted request's blocks and
            recomputes its tokens later; ``"swap"`` copies them to the host
            pool (falls back to recompute when the host pool is full).
        block_size: Tokens per KV block; must match the block manager's.
        priority_aging_s: Opt-in aging: a waiting (or swapped) request's effective
            priority rises by one for every this many seconds since it was queued or
            preempted, so low priorities cannot starve under a stream of higher ones.
            ``None``: strict priority order.

    Example:
        >>> SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4).block_size
        16
    """

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    long_prefill_chunk: int | None = None
    preemption_mode: PreemptionMode = "recompute"
    block_size: int = 16
    priority_aging_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        chunk = self.long_prefill_chunk
        bad_chunk = isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1
        if chunk is not None and bad_chunk:
            raise ConfigError(f"long_prefill_chunk must be an int >= 1 or None, got {chunk!r}")
        if self.preemption_mode not in ("recompute", "swap"):
            raise ConfigError(
                f"preemption_mode must be 'recompute' or 'swap', got {self.preemption_mode!r}"
            )
        aging = self.priority_aging_s
        if aging is not None and (isinstance(aging, bool) or not isinstance(aging, int | float)
                                  or not 0 < aging < float("inf")):
            raise ConfigError(f"priority_aging_s must be None or a positive number, got {aging!r}")

"""Prometheus metrics of one server (its own registry: two apps in a process never
share counters).

Per request (recorded by the handlers): requests by finish reason, prompt and generated
tokens, time to first token and inter-token latency histograms. Per scrape (read from
``engine.stats()``): KV blocks used / free / cached, queue lengths, preemptions,
speculation drafts and acceptance.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _EngineCollector(Collector):
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        try:
            stats = self.engine.stats()
        except Exception:  # not started or dead: /health says so; no engine gauges
            return
        gauges = {
            "kv_blocks_used": (
                "KV cache blocks holding a running request's tokens",
                "kv_blocks_used",
            ),
            "kv_blocks_free": ("KV cache blocks free", "kv_blocks_free"),
            "kv_blocks_cached": ("KV cache blocks kept for prefix reuse", "kv_blocks_cached"),
            "kv_blocks_total": ("KV cache blocks in the pool", "kv_blocks_total"),
            "requests_running": ("requests being decoded or prefilled", "running"),
            "requests_waiting": ("requests queued for their first step", "waiting"),
            "requests_swapped": ("requests preempted to host memory", "swapped"),
        }
        counters = {
            "preemptions": ("requests preempted (recompute or swap)", "preemptions"),
            "forks": ("parallel samples started by forking a prompt's KV blocks", "forks"),
        }
        yield from _families(stats, gauges, counters)
        spec = stats.get("speculation")
        if spec:
            yield from _families(
                spec,
                {"spec_acceptance_rate": ("accepted / drafted tokens so far", "acceptance_rate")},
                {"spec_draft_tokens": ("draft tokens verified", "draft_tokens"),
                 "spec_accepted_tokens": ("draft tokens accepted", "accepted_tokens")},
            )  # fmt: skip


def _families(
    stats: dict[str, Any],
    gauges: dict[str, tuple[str, str]],
    counters: dict[str, tuple[str, str]],
) -> Iterator[Any]:
    """``streamgen_<name>`` gauges and counters, each ``name: (help, key in stats)``."""
    for name, (doc, key) in gauges.items():
        yield GaugeMetricFamily(f"streamgen_{name}", doc, value=float(stats[key]))
    for name, (doc, key) in counters.items():
        yield CounterMetricFamily(f"streamgen_{name}", doc, value=float(stats[key]))


class ServerMetrics:
    """The registry and the per-request instruments of one app."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "streamgen_requests", "finished requests (choices) by finish reason",
            ["finish_reason"], registry=self.registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "streamgen_prompt_tokens", "prompt tokens of admitted requests", registry=self.registry
        )
        self.generated_tokens = Counter(
            "streamgen_generation_tokens", "tokens generated", registry=self.registry
        )
        self.ttft = Histogram(
            "streamgen_time_to_first_token_seconds", "request start to its first token",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.itl = Histogram(
            "streamgen_inter_token_latency_seconds", "time between a request's tokens",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.registry.register(_EngineCollector(engine))

    def record(self, stream: Any, num_tokens: int, finish_reason: str | None) -> None:
        """A finished choice: its stream's timings and token count."""
        self.requests.labels(finish_reason=finish_reason or "abort").inc()
        self.generated_tokens.inc(num_tokens)
        if stream is None:  # a choice cancelled before it started
            return
        ttft = stream.metrics.ttft
        if ttft is not None:
            self.ttft.observe(ttft)
        for gap in stream.metrics.inter_token_latencies:
            self.itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""From per-request token times to the numbers in the tables and plots.

A run's traces (bench/systems/base.py) give, per request, when it was
submitted and when each token arrived. From them:

* ``tok_s``: output tokens of the counted requests over the run's span (first
  submission to the last counted token);
* ``ttft``: first token minus submission; ``itl``: gaps between consecutive
  tokens of one request; ``e2e``: last token minus submission;
* ``concurrency``: the mean number of requests in flight (Little's law: the
  sum of their e2e latencies over the span).

Repetitions are combined by the median of each scalar; the latency
distributions (for CDF plots) pool every repetition.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

CDF_POINTS = 41  # quantiles kept per distribution in a record (0%, 2.5%, ..., 100%)


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def quantiles(values: list[float], points: int = CDF_POINTS) -> list[float]:
    """``points`` evenly spaced quantiles from min to max (a compact CDF)."""
    if not values:
        return []
    ordered = sorted(values)
    last = len(ordered) - 1
    return [ordered[round(last * k / (points - 1))] for k in range(points)]


def counted(traces: list[dict[str, Any]], tag: str | None) -> list[dict[str, Any]]:
    return [t for t in traces if tag is None or t["tag"] == tag]


def latencies(traces: list[dict[str, Any]]) -> dict[str, list[float]]:
    """TTFT, ITL and e2e samples (seconds) of the requests that produced tokens."""
    ttft, itl, e2e = [], [], []
    for t in traces:
        times = t["token_times_s"]
        if not times:
            continue
        ttft.append(times[0] - t["submitted_s"])
        e2e.append(times[-1] - t["submitted_s"])
        itl += [b - a for a, b in itertools.pairwise(times)]
    return {"ttft": ttft, "itl": itl, "e2e": e2e}


def run_metrics(traces: list[dict[str, Any]], tag: str | None = None) -> dict[str, float]:
    """Scalar metrics of one run, over the requests tagged ``tag`` (None: all)."""
    chosen = counted(traces, tag)
    tokens = sum(len(t["token_times_s"]) for t in chosen)
    ends = [t["token_times_s"][-1] for t in chosen if t["token_times_s"]]
    begin = min((t["submitted_s"] for t in chosen), default=0.0)
    span = max(ends, default=begin) - begin
    lat = latencies(chosen)
    return {
        "output_tokens": tokens,
        "span_s": span,
        "tok_s": tokens / span if span > 0 else float("nan"),
        "ttft_p50_s": quantile(lat["ttft"], 0.5),
        "ttft_p99_s": quantile(lat["ttft"], 0.99),
        "itl_p50_s": quantile(lat["itl"], 0.5),
        "itl_p99_s": quantile(lat["itl"], 0.99),
        "e2e_p50_s": quantile(lat["e2e"], 0.5),
        "concurrency": sum(lat["e2e"]) / span if span > 0 else float("nan"),
    }


def combine(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median of every scalar over repetitions."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def pooled_cdfs(all_traces: list[list[dict[str, Any]]], tag: str | None) -> dict[str, list[float]]:
    """TTFT and ITL quantiles over every repetition's requests."""
    ttft: list[float] = []
    itl: list[float] = []
    for traces in all_traces:
        lat = latencies(counted(traces, tag))
        ttft += lat["ttft"]
        itl += lat["itl"]
    return {"ttft_s": quantiles(ttft), "itl_s": quantiles(itl)}


def same_tokens(traces: list[dict[str, Any]], reference: list[dict[str, Any]]) -> str:
    """How many requests produced exactly the reference's tokens, as "k/n"."""
    pairs = list(zip(traces, reference, strict=True))
    equal = sum(a["token_ids"] == b["token_ids"] for a, b in pairs)
    return f"{equal}/{len(pairs)}"

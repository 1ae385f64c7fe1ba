"""Metrics from token traces, and the deterministic workloads."""

from __future__ import annotations

import pytest

from bench.metrics import quantiles, run_metrics, same_tokens
from bench.workloads import Request, chat_mix, poisson_arrivals, with_typos


def trace(submitted: float, times: list[float], tag: str = "", ids: list[int] | None = None):
    return {"submitted_s": submitted, "tag": tag, "token_times_s": times,
            "token_ids": ids or list(range(len(times)))}  # fmt: skip


def test_run_metrics_from_traces() -> None:
    traces = [trace(0.0, [1.0, 1.5, 2.0]), trace(1.0, [2.0, 3.0], tag="slow")]
    m = run_metrics(traces)
    assert m["output_tokens"] == 5 and m["span_s"] == 3.0
    assert m["tok_s"] == pytest.approx(5 / 3)
    assert m["ttft_p50_s"] == 1.0 and m["itl_p50_s"] == 0.5 and m["itl_p99_s"] == 1.0
    assert m["concurrency"] == pytest.approx((2.0 + 2.0) / 3.0)  # Little's law
    fast = run_metrics(traces, tag="")
    assert fast["output_tokens"] == 3 and fast["tok_s"] == pytest.approx(1.5)


def test_quantiles_and_token_agreement() -> None:
    assert quantiles([3.0, 1.0, 2.0], points=3) == [1.0, 2.0, 3.0]
    a = [trace(0, [1.0], ids=[5]), trace(0, [1.0], ids=[6])]
    b = [trace(0, [1.0], ids=[5]), trace(0, [1.0], ids=[7])]
    assert same_tokens(a, b) == "1/2"


def test_workloads_are_deterministic() -> None:
    first = chat_mix(16, seed=3, prompt_range=(20, 600), output_range=(16, 256), vocab=49152)
    assert first == chat_mix(16, seed=3, prompt_range=(20, 600), output_range=(16, 256),
                             vocab=49152)  # fmt: skip
    assert all(20 <= len(r.prompt) <= 600 and 16 <= r.output_len <= 256 for r in first)
    arrivals = [r.arrival_s for r in poisson_arrivals(first, rate=2.0, seed=3)]
    assert arrivals[0] == 0.0 and arrivals == sorted(arrivals) and arrivals[-1] > 0
    text = "the quick brown foxes jumped over lazy sleeping dogs " * 5
    assert with_typos(text, seed=1) == with_typos(text, seed=1) != text


def test_request_round_trips_through_json() -> None:
    request = Request((1, 2, 3), 4, arrival_s=0.5, read_delay_s=0.1, tag="slow")
    assert Request.from_json(request.to_json()) == request

"""One table layout for stdout and for bench/RESULTS.md, from a record's rows."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

Row = dict[str, Any]


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, fmt)


def _pair_ms(metrics: dict[str, float], key: str) -> str:
    p50, p99 = metrics.get(f"{key}_p50_s"), metrics.get(f"{key}_p99_s")
    if p50 is None or math.isnan(p50):
        return "-"
    return f"{p50 * 1e3:.0f} / {_num(p99 * 1e3 if p99 is not None else None, '.0f')}"


def _ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.2f}x"


def _roofline(row: Row) -> str:
    roof = row.get("roofline")
    if not roof:
        return "-"
    return f"{roof['tok_s']:.1f} ({row['metrics']['tok_s'] / roof['tok_s']:.0%})"


def columns(baseline_arm: str | None, metric: str) -> list[tuple[str, Callable[[Row], str]]]:
    """(header, cell) for every column; a row without metrics shows why."""
    cols: list[tuple[str, Callable[[Row], str]]] = [
        ("dtype", lambda r: r["dtype"]),
        ("arm", lambda r: r["arm"]),
        ("system", lambda r: r["system"]),
        (metric, lambda r: _num(r["metrics"]["tok_s"], ".1f")),
        ("TTFT ms p50 / p99", lambda r: _pair_ms(r["metrics"], "ttft")),
        ("ITL ms p50 / p99", lambda r: _pair_ms(r["metrics"], "itl")),
        ("in flight", lambda r: _num(r["metrics"]["concurrency"], ".1f")),
        ("streamgen ÷ this", lambda r: _ratio(r.get("streamgen_ratio"))),
    ]
    if baseline_arm is not None:
        cols.append((f"vs {baseline_arm}", lambda r: _ratio(r.get("vs_baseline"))))
    cols += [
        ("same tokens", lambda r: r.get("same_tokens") or "-"),
        ("roofline tok/s (share)", _roofline),
    ]
    return cols


def _cells(
    rows: list[Row], baseline_arm: str | None, metric: str
) -> tuple[list[str], list[list[str]]]:
    cols = columns(baseline_arm, metric)
    body = []
    for row in rows:
        if "unavailable" in row:
            body.append(
                [row["dtype"], row["arm"], row["system"], row["unavailable"]]
                + [""] * (len(cols) - 4)
            )
        else:
            body.append([cell(row) for _, cell in cols])
    return [header for header, _ in cols], body


def render_text(rows: list[Row], baseline_arm: str | None, metric: str) -> str:
    headers, body = _cells(rows, baseline_arm, metric)
    widths = [
        max([len(h)] + [len(r[i]) for r in body if not _is_note(r)]) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    for r in body:
        if _is_note(r):
            lines.append(
                "  ".join(c.ljust(w) for c, w in zip(r[:3], widths, strict=False)) + "  " + r[3]
            )
        else:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    return "\n".join(lines)


def render_markdown(rows: list[Row], baseline_arm: str | None, metric: str) -> str:
    headers, body = _cells(rows, baseline_arm, metric)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _is_note(cells: list[str]) -> bool:
    return len(cells) > 4 and all(c == "" for c in cells[4:])

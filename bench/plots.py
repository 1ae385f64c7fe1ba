"""PNG plots of a record (matplotlib, optional): latency CDFs, throughput vs concurrency.

Plots are drawn from the record alone (its rows' medians and stored
quantiles), so they can be redrawn from bench/results/*.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any | None:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row: dict[str, Any], many_dtypes: bool, many_arms: bool) -> str:
    parts = [row["system"]]
    if many_arms:
        parts.append(row["arm"])
    if many_dtypes:
        parts.append(row["dtype"])
    return ", ".join(parts)


STYLES = ("-", "--", ":", "-.")


def _style(row: dict[str, Any], systems: list[str], arms: list[str], dtypes: list[str]) -> dict:
    """One colour per system, one line style per arm (then per dtype)."""
    color = f"C{systems.index(row['system']) % 10}"
    dash = STYLES[(arms.index(row["arm"]) + len(arms) * dtypes.index(row["dtype"])) % 4]
    return {"color": color, "linestyle": dash}


def _ordered(rows: list[dict[str, Any]], key: str) -> list[str]:
    return list(dict.fromkeys(r[key] for r in rows))


def write_plots(record: dict[str, Any], plot_dir: Path, stem: str, throughput: bool) -> list[Path]:
    """Write the record's plots into ``plot_dir``; [] (with a message) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        print("plots skipped: matplotlib is not installed (pip install -e '.[bench]')")
        return []
    plot_dir.mkdir(parents=True, exist_ok=True)
    rows = [r for r in record["rows"] if "metrics" in r]
    paths = [latency_cdfs(plt, rows, plot_dir / f"{stem}-latency-cdf.png", record["scenario"])]
    if throughput:
        paths.append(throughput_vs_concurrency(plt, rows, plot_dir / f"{stem}-throughput.png"))
    return paths


def latency_cdfs(plt: Any, rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """TTFT and inter-token latency CDFs, one line per system (and arm, dtype)."""
    many_dtypes = len({r["dtype"] for r in rows}) > 1
    many_arms = len({r["arm"] for r in rows}) > 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in (
        (axes[0], "ttft_s", "time to first token"),
        (axes[1], "itl_s", "inter-token latency"),
    ):
        for row in rows:
            # Log scale: a burst of tokens (speculation) has 0 ms gaps; show them at 0.01.
            values = [max(v * 1e3, 0.01) for v in row["cdf"][key]]
            if not values:
                continue
            fractions = [k / max(1, len(values) - 1) for k in range(len(values))]
            style = _style(row, *(_ordered(rows, k) for k in ("system", "arm", "dtype")))
            ax.step(values, fractions, where="post", label=_label(row, many_dtypes, many_arms),
                    **style)  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(f"{name} (ms, log scale)")
        ax.set_ylabel("fraction of samples")
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{title}: latency CDFs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_vs_concurrency(plt: Any, rows: list[dict[str, Any]], path: Path) -> Path:
    """Output tok/s against the mean number of requests in flight, one line per system."""
    many_dtypes = len({r["dtype"] for r in rows}) > 1
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    series: dict[str, list[tuple[float, float, str]]] = {}
    for row in rows:
        m = row["metrics"]
        series.setdefault(_label(row, many_dtypes, False), []).append(
            (m["concurrency"], m["tok_s"], row["arm"])
        )
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        for x, y, arm in points:
            ax.annotate(arm, (x, y), fontsize=6, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("mean requests in flight")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput vs concurrency")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

"""`splitserve bench --plot-dir`: the runs' latency CDFs and goodput
against request rate, as PNG files (matplotlib, imported only here)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def plot(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """Latency CDFs (one line per request rate) and, with several rates,
    goodput against request rate. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (key, label) in zip(
        axes, (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2e", "E2E")), strict=True
    ):
        for run in runs:
            xs = sorted(v * 1e3 for v in run["samples"][key])
            if xs:
                ys = [(i + 1) / len(xs) for i in range(len(xs))]
                ax.step(xs, ys, where="post", label=_rate_label(run["summary"]["request_rate"]))
        limit = runs[0]["summary"]["slo"].get(key)
        if limit is not None:
            ax.axvline(limit * 1e3, color="red", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(f"{label} (ms)")
        ax.set_ylabel("fraction of requests" if key != "itl" else "fraction of gaps")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    finite = [r for r in runs if not math.isinf(r["summary"]["request_rate"])]
    if len(finite) >= 2:
        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        rates = [r["summary"]["request_rate"] for r in finite]
        ax.plot(rates, [r["summary"]["goodput"] for r in finite], marker="o", label="goodput")
        ax.plot(
            rates,
            [r["summary"]["request_throughput"] for r in finite],
            marker="x",
            linestyle=":",
            label="throughput",
        )
        ax.plot(rates, rates, color="grey", linewidth=0.8, label="offered")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("req/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "goodput_vs_rate.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _rate_label(rate: float) -> str:
    return "all at once" if math.isinf(rate) else f"{rate:g} req/s"

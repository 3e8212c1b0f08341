"""The Orca paper's figure: median normalized latency against throughput, one
curve per system or policy; beside it, SLO attainment against offered load
when the runs had SLO targets."""
from __future__ import annotations

from collections import defaultdict


def plot(data_list: list[dict], path: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    groups = defaultdict(list)
    for data in data_list:
        for run in data["runs"]:
            groups[run["label"]].append(run)
    with_slo = any(r["metrics"].get("slo_attainment") is not None for runs in groups.values() for r in runs)
    fig, axes = plt.subplots(1, 2 if with_slo else 1, figsize=(11 if with_slo else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    for label, runs in groups.items():
        pts = sorted((r["metrics"]["request_throughput"], r["metrics"]["median_normalized_latency_ms"])
                     for r in runs if r["metrics"]["median_normalized_latency_ms"] is not None)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("median normalized latency (ms/token)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if with_slo:
        ax2 = axes[0][1]
        for label, runs in groups.items():
            pts = sorted((float(r["request_rate"]), 100.0 * r["metrics"]["slo_attainment"])
                         for r in runs if r["metrics"].get("slo_attainment") is not None
                         and r["request_rate"] != "inf")
            if pts:
                ax2.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax2.set_xlabel("offered load (req/s)")
        ax2.set_ylabel("requests meeting the SLO (%)")
        ax2.set_ylim(0, 105)
        ax2.grid(True, alpha=0.3)
        ax2.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

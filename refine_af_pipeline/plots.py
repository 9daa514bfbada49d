"""PNG charts for asset metadata (matplotlib, headless)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence


def line_chart_png(
    x: Sequence[float], series: Mapping[str, Sequence[float]], title: str, xlabel: str = "step"
) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(series), 1, figsize=(6, 1.8 * len(series)), sharex=True, squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], series.items()):
        ax.plot(list(x), list(values), marker="o", markersize=3)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel(xlabel)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()


def bar_panels_png(labels: Sequence[str], panels: Mapping[str, Mapping[str, Sequence[float]]], title: str) -> bytes:
    """One grouped bar chart per panel (e.g. per metric), stacked, sharing the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.22 * len(labels)), 2.6 * len(panels)), squeeze=False)
    pos = np.arange(len(labels))
    for ax, (panel, values) in zip(axes[:, 0], panels.items()):
        width = 0.8 / max(len(values), 1)
        for k, (name, vals) in enumerate(values.items()):
            ax.bar(pos + k * width, list(vals), width, label=name)
        ax.set_ylabel(panel, fontsize=8)
        ax.set_xticks(pos + width * (len(values) - 1) / 2, labels, rotation=75, ha="right", fontsize=6)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    plt.close(fig)
    return buf.getvalue()

"""Plots for the result files: grouped bars and lines (matplotlib, headless), and the two steps every
other plot shares (``pyplot()`` to start, ``save(fig, path)`` to finish)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_bars", "plot_lines", "pyplot", "save"]


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: benchmarks run on machines without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path) -> Path:
    """Lay out, write ``fig`` as a PNG (creating the folder) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def _labels(ax: Any, title: str, xlabel: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def plot_bars(
    path: str | Path,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str = "",
    ylabel: str = "",
    xlabel: str = "",
    annotate: Mapping[str, Sequence[str | None]] | None = None,
    log_y: bool = False,
) -> Path:
    """Grouped bars: one group per entry of ``groups``, one bar per series (None = no bar)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(groups) * max(1, len(series)) / 2), 4.2))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    for i, (name, values) in enumerate(series.items()):
        heights = [np.nan if v is None else float(v) for v in values]
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, heights, width, label=name)
        labels = (annotate or {}).get(name)
        if labels:
            for bar, text in zip(bars, labels, strict=False):
                if text and np.isfinite(bar.get_height()):
                    ax.annotate(
                        text,
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center",
                        va="bottom",
                        fontsize=7,
                    )
    ax.set_xticks(x, list(groups))
    _labels(ax, title, xlabel, ylabel)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def plot_lines(
    path: str | Path,
    x: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    *,
    title: str = "",
    ylabel: str = "",
    xlabel: str = "",
    log_x: bool = False,
    log_y: bool = False,
    secondary: Mapping[str, Sequence[float | None]] | None = None,
    secondary_ylabel: str = "",
    shade: Sequence[tuple[float, float, str]] = (),
) -> Path:
    """Lines over ``x``; ``secondary`` series go on a right-hand axis; ``shade`` = (x0, x1, label) spans."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for x0, x1, label in shade:
        ax.axvspan(x0, x1, alpha=0.12, color="grey")
        ax.annotate(
            label, ((x0 + x1) / 2, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=7
        )
    for name, values in series.items():
        ax.plot(x, [np.nan if v is None else v for v in values], marker="o", markersize=3, label=name)
    if secondary:
        ax2 = ax.twinx()
        for name, values in secondary.items():
            ax2.plot(
                x, [np.nan if v is None else v for v in values], linestyle="--", marker="x", markersize=3, label=name
            )
        ax2.set_ylabel(secondary_ylabel)
        handles, labels = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(handles + h2, labels + l2, fontsize=8)
    else:
        ax.legend(fontsize=8)
    _labels(ax, title, xlabel, ylabel)
    if log_x:
        ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    return save(fig, path)

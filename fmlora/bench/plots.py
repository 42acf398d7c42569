"""PNG figures for benchmark results (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_results"]


def _std(values: np.ndarray) -> np.ndarray:
    """Sample std over seeds, as summary.md reports (0 for a single seed)."""
    return values.std(0, ddof=1) if values.shape[0] > 1 else np.zeros(values.shape[1])


def plot_results(results: list[dict[str, Any]], out: Path) -> list[Path]:
    """One accuracy-matrix heatmap per method (mean over seeds) and one accuracy-vs-task plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []
    methods = list(dict.fromkeys(r["method"] for r in results))
    benchmark = results[0]["benchmark"] if results else ""
    for method in methods:
        rows = [r for r in results if r["method"] == method]
        size = len(rows[0]["accuracy_matrix"][-1])
        grid = np.full((len(rows[0]["accuracy_matrix"]), size), np.nan)
        for r in rows:
            for t, row in enumerate(r["accuracy_matrix"]):
                values = np.array(row + [np.nan] * (size - len(row)), dtype=float)
                grid[t] = np.where(np.isnan(grid[t]), 0, grid[t]) + values / len(rows)
        fig, ax = plt.subplots(figsize=(1 + 0.5 * size, 1 + 0.5 * grid.shape[0]))
        image = ax.imshow(grid * 100, vmin=0, vmax=100, cmap="viridis")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                colour = "black" if value > 0.6 else "white"  # readable on viridis' yellow and purple
                ax.text(j, i, f"{value * 100:.0f}", ha="center", va="center", fontsize=7, color=colour)
        ax.set_xlabel("evaluated task")
        ax.set_ylabel("after training task" if grid.shape[0] > 1 else "after joint training")
        ax.set_title(f"{benchmark}: {method} accuracy (%)")
        fig.colorbar(image, ax=ax)
        path = out / f"matrix-{method}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        rows = [r for r in results if r["method"] == method]
        curves = np.array([r["accuracy_curve"] for r in rows], dtype=float) * 100
        x = np.arange(1, curves.shape[1] + 1)
        if curves.shape[1] == 1:  # joint training: one point after all tasks
            total = len(rows[0]["accuracy_matrix"][0])
            ax.errorbar(
                [total], curves.mean(0), yerr=_std(curves), fmt="*", markersize=10, label=f"{method} (all data)"
            )
        else:
            ax.errorbar(x, curves.mean(0), yerr=_std(curves), marker="o", capsize=3, label=method)
    ax.set_xlabel("tasks learned")
    ax.set_ylabel("accuracy on the test data of all tasks seen (%)")
    ax.set_title(f"{benchmark}: accuracy vs tasks")
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / "accuracy-vs-tasks.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written

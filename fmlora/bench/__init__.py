"""``fmlora bench``: runs continual-learning methods over benchmark streams and writes results,
summaries and plots.

May import ``training``, ``model`` and ``data``; never the registry or the worker.
"""

from .plots import plot_results
from .runner import BENCHMARKS, METHODS, BenchSpec, run_benchmark, summary_markdown

__all__ = ["BENCHMARKS", "METHODS", "BenchSpec", "plot_results", "run_benchmark", "summary_markdown"]

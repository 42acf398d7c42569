"""The serving benchmarks, and the helpers they share, split by concern.

Run a benchmark from the repository root as a module::

    python -m benchmarks.perf --out runs/perf
    python -m benchmarks.load --out runs/load
    python -m benchmarks.swap --out runs/swap
    python -m benchmarks.soak --out runs/soak
    python -m benchmarks.fuzz --out runs/fuzz
    python -m benchmarks.training_cost --out runs/training-cost
    python -m benchmarks.probe_backbone --out runs/probe

The helpers:

* ``report``: statistics (``summarize``, ``ratio``) and result files (``write_json``
  adds the machine, the commit and the command);
* ``processes``: a real server as a child process (``ServerProcess``), thread limits, and what a
  process uses (RSS, GPU memory, CPU seconds, the server's /metrics);
* ``loadgen``: images, request bodies, and closed-loop HTTP load (``http_load``);
* ``models``: the backbones a benchmark runs on (``model_config("offline" | "tiny" | timm name)``);
* ``publish``: versions published into a registry without training (``Publisher``, ``make_home``),
  good ones and deliberately bad ones, all through ``fmlora.registry.publish_version``;
* ``plots``: grouped bars and lines (matplotlib, headless).

Benchmarks measure; they never assert speed (tests/integration/bench and tests/integration/reliability
check the shape and the invariants of their output).
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
"""The repository root: the server child processes run from it."""

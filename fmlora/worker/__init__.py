"""The training worker: claims queued tasks under a lease, trains, evaluates, gates and publishes.

May import every layer below it (``registry``, ``training``, ``model``, ``data``).
"""

from .worker import GateConfig, Worker, WorkerConfig

__all__ = ["GateConfig", "Worker", "WorkerConfig"]

"""The training worker: claims queued tasks under a lease, trains, evaluates, gates and publishes.

May import every layer below it (``registry``, ``training``, ``model``, ``data``).
"""

from .gate import GateConfig
from .worker import Worker, WorkerConfig

__all__ = ["GateConfig", "Worker", "WorkerConfig"]

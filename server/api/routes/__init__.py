"""HTTP routes, one module per resource (predict, tasks, models, health)."""

from server.api.routes import health, models, predict, tasks

__all__ = ["health", "models", "predict", "tasks"]

"""HTTP routes, one module per resource (predict, tasks, models, health, whoami)."""

from server.api.routes import health, models, predict, tasks, whoami

__all__ = ["health", "models", "predict", "tasks", "whoami"]

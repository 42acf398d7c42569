"""The serving system around ``fmlora``: ``server.core`` (framework-free engine) and ``server.api``
(the FastAPI layer), plus ``server.cli`` (``fmlora serve``).

It depends on ``fmlora``; ``fmlora`` never depends on it (an import-linter contract enforces it).
"""

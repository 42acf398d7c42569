"""The FastAPI serving layer (app factory, routes, micro-batcher, hot swap) lives here.

It depends on ``fmlora``; ``fmlora`` never depends on it (enforced by tests/unit/test_boundaries.py).
"""

"""The HTTP layer: the FastAPI app factory, its state, settings, routes, schemas, the error envelope,
auth and metrics. It holds the engine by the ``server.core.protocol.ServingEngine`` seam (the app's
``ServerState``); the core never imports this package.
"""

"""The HTTP layer: the FastAPI app factory, settings, routes, schemas, the error envelope, auth and
metrics. It holds the engine from ``server.core``; the core never imports this package.
"""

"""fmlora_client: the Python SDK for an fmlora server. Imports only httpx and pydantic."""

__version__ = "0.1.0"

"""Fixtures for the client SDK tests: a scripted mock server (httpx.MockTransport) and a clean environment.

These tests never start a server and never import torch themselves (the repository's tests/conftest.py
does, for the other suites).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fmlora_client import AsyncClient, Client

from .mock_server import Server, Sleeps


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FMLORA_URL", "FMLORA_API_KEY", "FMLORA_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Server:
    return Server()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def make_client(server: Server, sleeps: Sleeps) -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(**kwargs: Any) -> Client:
        kwargs.setdefault("base_url", "http://fmlora.test")
        client = Client(transport=server.transport(), **kwargs)
        client._sleep = sleeps.sleep
        client._clock = sleeps.clock
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def make_async_client(server: Server, sleeps: Sleeps) -> Callable[..., AsyncClient]:
    def make(**kwargs: Any) -> AsyncClient:
        kwargs.setdefault("base_url", "http://fmlora.test")
        client = AsyncClient(transport=server.transport(), **kwargs)
        client._sleep = sleeps.asleep
        client._clock = sleeps.clock
        return client

    return make

"""Settings: arguments, then FMLORA_URL / FMLORA_API_KEY / FMLORA_ADMIN_KEY, then defaults; keys per call."""

from __future__ import annotations

import fmlora_client as fc
import httpx
import pytest
from fmlora_client import Client, ClientSettings

from .mock_server import models_body


def test_defaults(monkeypatch):
    settings = ClientSettings.resolve()
    assert settings.base_url == "http://127.0.0.1:8000"
    assert settings.api_key is None and settings.admin_key is None
    client = Client()
    try:
        assert client.base_url == "http://127.0.0.1:8000"
        assert client.timeout == fc.DEFAULT_TIMEOUT
        assert client.timeout.connect == 10.0 and client.timeout.read == 60.0
        assert client.retry_policy.max_retries == 2
    finally:
        client.close()
    assert client.is_closed


def test_environment(monkeypatch):
    monkeypatch.setenv("FMLORA_URL", "https://models.example:9000/")
    monkeypatch.setenv("FMLORA_API_KEY", "env-api")
    monkeypatch.setenv("FMLORA_ADMIN_KEY", "env-admin")
    settings = ClientSettings.resolve()
    assert settings.base_url == "https://models.example:9000"
    assert settings.api_key == "env-api" and settings.admin_key == "env-admin"


def test_arguments_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("FMLORA_URL", "http://env:1")
    monkeypatch.setenv("FMLORA_API_KEY", "env-api")
    settings = ClientSettings.resolve("http://arg:2", api_key="arg-api")
    assert settings.base_url == "http://arg:2" and settings.api_key == "arg-api"


def test_keys_never_show_in_repr():
    client = Client(api_key="secret-api", admin_key="secret-admin")
    try:
        assert "secret" not in repr(client) and "secret" not in repr(client.settings)
    finally:
        client.close()


@pytest.mark.parametrize("url", ["ftp://x", "not a url", "/relative"])
def test_bad_base_url(url):
    with pytest.raises(fc.FmloraClientError):
        ClientSettings.resolve(url)


def test_env_keys_reach_the_wire(monkeypatch, server, make_client):
    monkeypatch.setenv("FMLORA_API_KEY", "env-api")
    monkeypatch.setenv("FMLORA_ADMIN_KEY", "env-admin")
    server.on("GET", "/models", httpx.Response(200, json=models_body(1, 1)))
    server.on("POST", "/models/1/activate", httpx.Response(200, json={"live": 1, "serving": 1}))
    client = make_client()
    client.models()
    client.activate(1)
    assert server.calls("GET", "/models")[0].headers["authorization"] == "Bearer env-api"
    assert server.calls("POST", "/models/1/activate")[0].headers["authorization"] == "Bearer env-admin"


def test_api_calls_fall_back_to_the_admin_key(server, make_client):
    server.on("GET", "/models", httpx.Response(200, json=models_body(1, 1)))
    make_client(admin_key="only-admin").models()
    assert server.requests[-1].headers["authorization"] == "Bearer only-admin"


def test_admin_calls_fall_back_to_the_api_key(server, make_client):
    server.on("POST", "/models/1/activate", httpx.Response(200, json={"live": 1}))
    make_client(api_key="api-only").activate(1)  # the server answers 403, not "missing Authorization"
    assert server.requests[-1].headers["authorization"] == "Bearer api-only"


def test_no_key_sends_no_authorization(server, make_client):
    server.on("GET", "/models", httpx.Response(200, json=models_body(1, 1)))
    server.on("POST", "/models/1/activate", httpx.Response(200, json={"live": 1}))
    client = make_client()
    client.models()
    client.activate(1)
    assert all("authorization" not in r.headers for r in server.requests)


def test_base_url_with_a_path_prefix_and_user_agent(server):
    seen = []
    transport = httpx.MockTransport(lambda r: seen.append(r) or httpx.Response(200, json={"status": "ok"}))
    with Client("http://gateway.test/fmlora/", transport=transport) as client:
        assert client.health().status == "ok"
    assert str(seen[0].url) == "http://gateway.test/fmlora/healthz"
    assert seen[0].headers["user-agent"].startswith(f"fmlora-client/{fc.__version__}")
    assert seen[0].headers["accept"] == "application/json"


def test_timeout_is_explicit_and_overridable():
    seen = []

    def handler(request):
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json={"status": "ok"})

    with Client(transport=httpx.MockTransport(handler)) as client:
        client.health()
    with Client(transport=httpx.MockTransport(handler), timeout=3.5) as client:
        client.health()
    assert seen[0] == {"connect": 10.0, "read": 60.0, "write": 60.0, "pool": 60.0}
    assert seen[1] == {"connect": 3.5, "read": 3.5, "write": 3.5, "pool": 3.5}


def test_injected_http_client_keeps_its_timeout_and_stays_open():
    seen = []

    def handler(request):
        seen.append(request.extensions["timeout"])
        return httpx.Response(200, json={"status": "ok"})

    http = httpx.Client(transport=httpx.MockTransport(handler), timeout=7.0)
    with Client(http_client=http) as client:
        client.health()
    assert seen[0]["read"] == 7.0
    assert not http.is_closed
    http.close()


def test_transport_and_http_client_are_exclusive():
    with pytest.raises(fc.InvalidInputError):
        Client(transport=httpx.MockTransport(lambda r: httpx.Response(200)), http_client=httpx.Client())

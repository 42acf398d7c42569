"""Bearer keys: 401 for missing/malformed/unknown keys, 403 for a known key without the right, management off
without an admin key."""

from __future__ import annotations

import base64
import logging

import pytest

from server.api.settings import Settings

from .conftest import ADMIN, API, assert_envelope, auth, png_bytes, publish_fake_version

IMAGE = {"images": [base64.b64encode(png_bytes()).decode()]}


@pytest.fixture
def versioned(registry):
    publish_fake_version(registry, ["pets"])
    publish_fake_version(registry, ["pets", "birds"])
    return registry


def test_activation_needs_the_admin_key(make_client, versioned):
    client = make_client()
    r = client.post("/models/1/activate")
    assert_envelope(r, 401, "unauthorized")
    assert r.headers["www-authenticate"].startswith("Bearer")
    # An unknown key is an invalid credential (401, RFC 6750); a known key without the right is 403.
    r = client.post("/models/1/activate", headers=auth("wrong-key-0123456789"))
    assert_envelope(r, 401, "unauthorized")
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert_envelope(client.post("/models/1/activate", headers=auth(API)), 401, "unauthorized")
    client_with_api_key = make_client(api_key=API)
    assert_envelope(client_with_api_key.post("/models/1/activate", headers=auth(API)), 403, "forbidden")
    assert versioned.live_version() == 2
    assert client.post("/models/1/activate", headers=auth(ADMIN)).status_code == 200


@pytest.mark.parametrize(
    "header",
    [
        "Basic dXNlcjpwYXNz",
        "Bearer",
        "Bearer ",
        "Token abc",
        f"Bearer {ADMIN} extra",
        "bearer\u00e9 x",
        "Bearer k\u00e9y",
    ],
)
def test_malformed_authorization_is_401(make_client, versioned, header):
    client = make_client()
    r = client.post("/models/1/activate", headers={"Authorization": header.encode("utf-8")})
    assert_envelope(r, 401, "unauthorized")


def test_scheme_is_case_insensitive(make_client, versioned):
    client = make_client()
    assert client.post("/models/1/activate", headers={"Authorization": f"bearer {ADMIN}"}).status_code == 200


def test_task_upload_needs_the_admin_key_before_the_body_is_read(make_client, versioned):
    client = make_client()
    r = client.post("/tasks", files={"archive": ("a.zip", b"PK\x03\x04" * 10)}, data={"name": "x"})
    assert_envelope(r, 401, "unauthorized")
    r = client.post("/tasks", content=b"not even multipart", headers=auth("nope-nope-nope-nope"))
    assert_envelope(r, 401, "unauthorized")


def test_without_an_admin_key_management_is_off(make_client, versioned):
    client = make_client(admin_key=None)
    for headers in ({}, auth(ADMIN)):
        error = assert_envelope(client.post("/models/1/activate", headers=headers), 403, "admin_disabled")
        assert "FMLORA_ADMIN_KEY" in error["message"]
    assert client.post("/predict", json=IMAGE).status_code == 200  # predictions stay open


def test_auth_disabled_opens_everything(make_client, versioned):
    client = make_client(admin_key=None, api_key=API, auth_disabled=True)
    assert client.post("/models/1/activate").status_code == 200
    assert client.post("/predict", json=IMAGE).status_code == 200
    assert client.get("/info").json()["auth"] == {"disabled": True, "admin_enabled": True, "api_key_required": False}


def test_api_key_guards_predictions_and_reads(make_client, versioned):
    client = make_client(api_key=API)
    guarded = [
        ("POST", "/predict", {"json": IMAGE}, 200),
        ("GET", "/tasks", {}, 200),
        ("GET", "/tasks/abc", {}, 404),  # past the key check: no such task
        ("GET", "/models", {}, 200),
        ("GET", "/models/1", {}, 200),
        ("GET", "/info", {}, 200),
    ]
    for method, path, kwargs, status in guarded:
        assert_envelope(client.request(method, path, **kwargs), 401, "unauthorized")
        assert_envelope(client.request(method, path, headers=auth("wrong-key-0123456789"), **kwargs), 401)
        for key in (API, ADMIN):
            r = client.request(method, path, headers=auth(key), **kwargs)
            assert r.status_code == status, (path, r.text)
    for open_path in ("/healthz", "/readyz", "/metrics"):
        assert client.get(open_path).status_code == 200


def test_keys_are_never_logged_or_echoed(make_client, versioned, caplog):
    with caplog.at_level(logging.DEBUG):
        client = make_client(api_key=API)
        client.post("/predict", json=IMAGE, headers=auth(API))
        client.post("/predict", json=IMAGE, headers=auth("wrong-key-0123456789"))
        client.post("/models/1/activate", headers=auth(ADMIN))
        r = client.post("/models/1/activate", headers=auth(API))
    assert API not in r.text and ADMIN not in r.text
    logged = "\n".join(rec.getMessage() for rec in caplog.records)
    assert ADMIN not in logged and API not in logged and "wrong-key" not in logged
    assert ADMIN not in repr(Settings(admin_key=ADMIN)) and ADMIN not in str(client.app.state.fmlora.settings)


@pytest.mark.parametrize("key", ["short", "has space in the middle of it", "\x01" * 20])
def test_weak_keys_are_refused_without_echoing_them(key):
    with pytest.raises(ValueError) as excinfo:
        Settings(admin_key=key)
    assert key not in str(excinfo.value)


def test_keys_are_compared_as_fixed_length_digests(monkeypatch):
    """compare_digest returns early on inputs of different lengths; the server only ever compares
    SHA-256 digests, so the configured key's length does not show in the timing."""
    import hmac

    from server.api import auth as auth_module

    seen: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    from pydantic import SecretStr

    assert auth_module._matches(ADMIN.encode(), SecretStr(ADMIN))
    assert not auth_module._matches(b"x", SecretStr(ADMIN))
    assert seen == [(32, 32), (32, 32)]

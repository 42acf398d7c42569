"""Bearer keys: 401 for missing/malformed, 403 for wrong keys, management off without an admin key."""

from __future__ import annotations

import base64
import logging

import pytest

from server.settings import Settings

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
    assert_envelope(client.post("/models/1/activate", headers=auth("wrong-key-0123456789")), 403, "forbidden")
    assert_envelope(client.post("/models/1/activate", headers=auth(API)), 403, "forbidden")
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
    assert_envelope(r, 403, "forbidden")


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
        ("POST", "/predict", {"json": IMAGE}),
        ("GET", "/tasks", {}),
        ("GET", "/tasks/abc", {}),
        ("GET", "/models", {}),
        ("GET", "/models/1", {}),
        ("GET", "/info", {}),
    ]
    for method, path, kwargs in guarded:
        assert_envelope(client.request(method, path, **kwargs), 401, "unauthorized")
        assert_envelope(client.request(method, path, headers=auth("wrong-key-0123456789"), **kwargs), 403)
        for key in (API, ADMIN):
            r = client.request(method, path, headers=auth(key), **kwargs)
            assert r.status_code in (200, 404), (path, r.text)
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

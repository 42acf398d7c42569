"""The console, the offline docs and the security headers over HTTP (no browser, no model): what the
browser tests rely on, checked in milliseconds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.console import CONTENT_SECURITY_POLICY, DOCS_CONTENT_SECURITY_POLICY, STATIC_DIRECTORY
from server.api.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
ADMIN = "console-admin-key-0123456789"
API = "console-api-key-0123456789"


def client(tmp_path: Path, **settings: object) -> TestClient:
    # No lifespan (no `with`): these routes need neither the registry nor the engine.
    return TestClient(create_app(Settings(home=tmp_path / "home", **settings)))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_whoami_names_the_role_of_the_presented_key(tmp_path):
    c = client(tmp_path, admin_key=ADMIN, api_key=API)
    assert c.get("/whoami", headers=bearer(ADMIN)).json() == {
        "role": "admin",
        "management": True,
        "reads_need_key": True,
    }
    assert c.get("/whoami", headers=bearer(API)).json()["role"] == "reader"
    assert c.get("/whoami").json()["role"] == "anonymous"
    unknown = c.get("/whoami", headers=bearer("x" * 20))
    assert unknown.status_code == 401 and unknown.json()["error"]["message"] == "this key is not valid for this server"
    assert c.get("/whoami", headers={"Authorization": "Basic abc"}).status_code == 401


def test_whoami_reports_management_off_and_auth_disabled(tmp_path):
    off = client(tmp_path, api_key=API).get("/whoami", headers=bearer(API)).json()
    assert off == {"role": "reader", "management": False, "reads_need_key": True}
    (tmp_path / "b").mkdir()
    opened = client(tmp_path / "b", auth_disabled=True).get("/whoami").json()
    assert opened == {"role": "admin", "management": True, "reads_need_key": False}


@pytest.mark.parametrize("path", ["/console", "/console/static/console.js", "/whoami", "/openapi.json", "/nope"])
def test_every_response_carries_the_strict_policy(tmp_path, path):
    response = client(tmp_path).get(path)
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


def test_policies_allow_only_same_origin_scripts():
    for policy in (CONTENT_SECURITY_POLICY, DOCS_CONTENT_SECURITY_POLICY):
        directives = dict(d.split(" ", 1) for d in policy.split("; "))
        assert directives["script-src"] == "'self'" and directives["connect-src"] == "'self'"
        assert directives["frame-ancestors"] == "'none'" and directives["object-src"] == "'none'"
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY


def _references(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/console"])
def test_pages_load_only_local_files_and_have_no_inline_code(tmp_path, page):
    c = client(tmp_path)
    response = c.get(page)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    html = response.text
    expected = DOCS_CONTENT_SECURITY_POLICY if page != "/console" else CONTENT_SECURITY_POLICY
    assert response.headers["content-security-policy"] == expected
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []  # every script is a file
    assert not re.search(r"\son[a-z]+=|\sstyle=|<style", html)  # no inline handlers or styles
    refs = [r for r in _references(html) if not r.startswith("#")]
    assert refs and all("://" not in r and not r.startswith("/") for r in refs), refs  # relative: proxy prefixes
    for ref in refs:
        asset = c.get(f"/{ref}")
        assert asset.status_code == 200, ref


def test_console_files_are_revalidated_not_cached_blindly(tmp_path):
    c = client(tmp_path)
    for path in ("/console", "/console/static/console.js"):
        response = c.get(path)
        assert response.headers["cache-control"] == "no-cache" and response.headers["etag"]
        assert c.get(path, headers={"If-None-Match": response.headers["etag"]}).status_code == 304


def test_redoc_bundle_is_patched_to_stay_offline(tmp_path):
    c = client(tmp_path)
    bundle = c.get("/docs/vendor/redoc.standalone.js")
    assert bundle.status_code == 200 and bundle.headers["content-type"].startswith("text/javascript")
    assert b"cdn.redoc.ly" not in bundle.content and len(bundle.content) > 500_000
    assert c.get("/docs/vendor/swagger-ui-bundle.js").status_code == 200


def test_the_console_script_keeps_the_key_in_session_storage_only():
    code = "\n".join(p.read_text(encoding="utf-8") for p in STATIC_DIRECTORY.glob("*.js"))
    assert "sessionStorage" in code
    for forbidden in ("localStorage", "document.cookie", "console.log", "innerHTML", "eval(", 'setAttribute("style'):
        assert forbidden not in code, forbidden


def test_package_data_ships_every_console_file():
    assert '"server.api.console" = ["static/*"]' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert [p for p in STATIC_DIRECTORY.iterdir() if p.is_dir()] == []  # "static/*" is not recursive
    assert {p.name for p in STATIC_DIRECTORY.iterdir()} >= {"index.html", "console.js", "console.css", "favicon.svg"}

"""The committed OpenAPI schema (openapi.json) matches the app, and is self-consistent."""

from __future__ import annotations

import json
from pathlib import Path

from server.cli import openapi_document

ROOT = Path(__file__).resolve().parents[3]
REGENERATE = ".venv/bin/python -m server openapi --out openapi.json"


def test_committed_openapi_matches_the_app():
    committed = (ROOT / "openapi.json").read_text(encoding="utf-8")
    current = openapi_document()
    assert committed == current, (
        f"openapi.json is out of date with the app. If the API change is intended, regenerate it with:\n"
        f"    {REGENERATE}\nand commit it (API consumers diff this file)."
    )


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_schema_references_resolve_and_cover_the_api():
    doc = json.loads(openapi_document())
    schemas = doc["components"]["schemas"]
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    expected = {
        ("post", "/predict"),
        ("post", "/tasks"),
        ("get", "/tasks"),
        ("get", "/tasks/{task_id}"),
        ("get", "/models"),
        ("get", "/models/{version}"),
        ("post", "/models/{version}/activate"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/info"),
        ("get", "/metrics"),
        ("get", "/whoami"),
    }
    assert {(m, p) for p, ops in doc["paths"].items() for m in ops} == expected
    predict = doc["paths"]["/predict"]["post"]
    assert set(predict["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    assert {"400", "413", "415", "422", "429", "503", "504"} <= set(predict["responses"])
    upload = doc["paths"]["/tasks"]["post"]
    assert {"200", "202", "409", "413", "415"} <= set(upload["responses"])
    assert upload["security"] == [{"HTTPBearer": []}]
    assert doc["paths"]["/models/{version}/activate"]["post"]["security"] == [{"HTTPBearer": []}]

"""A scripted fmlora server for the client tests (httpx.MockTransport), and helpers to read requests."""

from __future__ import annotations

import email
import email.policy
import json
from dataclasses import dataclass, field
from typing import Any

import httpx


def envelope(status: int, error_type: str | None, message: str = "nope", request_id: str = "rid-1", **headers: str):
    body = {"error": {"type": error_type, "message": message, "request_id": request_id}}
    if error_type is None:
        del body["error"]["type"]
    return httpx.Response(status, json=body, headers={"X-Request-ID": request_id, **headers})


def prediction_body(n: int, version: int | None = 3, label: str = "robin", offset: int = 0) -> dict[str, Any]:
    return {
        "model_version": version,
        "snapshot_sha256": None if version is None else f"sha-{version}",
        "results": [
            {
                "predictions": [{"label": f"{label}-{offset + i}", "score": 0.9, "task": "birds"}],
                "prompt": {"mode": "auto", "task": "birds", "weights": {"birds": 1.0}},
            }
            for i in range(n)
        ],
    }


def task_body(task_id: str = "t1", status: str = "queued", version: int | None = None, **extra: Any) -> dict:
    return {
        "id": task_id,
        "name": extra.pop("name", "birds"),
        "kind": "class",
        "status": status,
        "progress": extra.pop("progress", {}),
        "metrics": {},
        "version": version,
        "error": extra.pop("error", None),
        **extra,
    }


def models_body(live: int | None, serving: int | None, versions: dict[int, list[str]] | None = None) -> dict:
    versions = versions or {}
    return {
        "live": live,
        "serving": serving,
        "versions": [
            {"version": v, "sha256": f"sha-{v}", "state": "live" if v == live else "retired", "tasks": t, "card": {}}
            for v, t in sorted(versions.items())
        ],
    }


def multipart_parts(request: httpx.Request) -> list[tuple[str, str | None, bytes]]:
    """(field name, file name, payload) for every part of a multipart request, in order."""
    content = request.read()
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.message_from_bytes(head + content, policy=email.policy.HTTP)
    assert message.is_multipart()
    parts = []
    for part in message.iter_parts():
        parts.append(
            (part.get_param("name", header="content-disposition"), part.get_filename(), part.get_payload(decode=True))
        )
    return parts


def form_fields(request: httpx.Request) -> dict[str, str]:
    return {name: payload.decode() for name, filename, payload in multipart_parts(request) if filename is None}


def json_body(request: httpx.Request) -> Any:
    return json.loads(request.read())


@dataclass
class Server:
    """A scripted server: routes (method, path) to handlers or queues of responses; records every request."""

    routes: dict[tuple[str, str], Any] = field(default_factory=dict)
    requests: list[httpx.Request] = field(default_factory=list)

    def on(self, method: str, path: str, *responses: Any) -> Server:
        """Answer with these in turn (the last repeats). Each is a Response, an exception, or a handler."""
        self.routes[(method, path)] = list(responses)
        return self

    def calls(self, method: str, path: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == method and r.url.path == path]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        queue = self.routes.get((request.method, request.url.path))
        if queue is None:
            return envelope(404, "not_found", f"no route for {request.method} {request.url.path}")
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, BaseException):
            raise item
        if callable(item):
            return item(request)
        return item

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


@dataclass
class Sleeps:
    """A fake clock: sleeping advances it instantly and records the delay."""

    delays: list[float] = field(default_factory=list)
    now: float = 1000.0

    def sleep(self, seconds: float) -> None:
        self.delays.append(seconds)
        self.now += seconds

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)

    def clock(self) -> float:
        return self.now

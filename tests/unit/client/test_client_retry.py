"""Retries: exactly when they should happen, never for non-idempotent calls, honouring Retry-After."""

from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import fmlora_client as fc
import httpx
import pytest
from fmlora_client import RetryPolicy
from fmlora_client._retry import parse_retry_after

from .mock_server import envelope, form_fields, models_body, multipart_parts, prediction_body, task_body

OK_MODELS = httpx.Response(200, json=models_body(1, 1))


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504])
def test_retryable_statuses_are_retried_until_success(make_client, server, sleeps, status):
    server.on("GET", "/models", envelope(status, None), envelope(status, None), OK_MODELS)
    assert make_client(max_retries=2).models().live == 1
    assert len(server.calls("GET", "/models")) == 3
    assert len(sleeps.delays) == 2


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 415, 422, 500, 501])
def test_other_statuses_are_never_retried(make_client, server, sleeps, status):
    server.on("GET", "/models", envelope(status, None), OK_MODELS)
    with pytest.raises(fc.APIStatusError):
        make_client(max_retries=5).models()
    assert len(server.calls("GET", "/models")) == 1
    assert sleeps.delays == []


def test_retries_stop_after_max_retries(make_client, server, sleeps):
    server.on("GET", "/models", envelope(503, "not_ready"))
    with pytest.raises(fc.ServiceUnavailableError):
        make_client(max_retries=3).models()
    assert len(server.calls("GET", "/models")) == 4
    assert len(sleeps.delays) == 3


def test_max_retries_zero_disables_retrying(make_client, server, sleeps):
    server.on("GET", "/models", envelope(503, None))
    with pytest.raises(fc.ServiceUnavailableError):
        make_client(max_retries=0).models()
    assert len(server.calls("GET", "/models")) == 1 and sleeps.delays == []


@pytest.mark.parametrize(
    "error",
    [httpx.ConnectError("refused"), httpx.ReadError("reset"), httpx.ConnectTimeout("slow"), httpx.ReadTimeout("x")],
)
def test_connection_errors_are_retried_for_idempotent_calls(make_client, server, sleeps, error):
    server.on("GET", "/tasks/t1", error, httpx.Response(200, json=task_body()))
    assert make_client().get_task("t1").id == "t1"
    assert len(server.calls("GET", "/tasks/t1")) == 2
    assert len(sleeps.delays) == 1


def test_connection_errors_exhausting_retries_raise_connection_error(make_client, server, sleeps):
    server.on("GET", "/healthz", httpx.ConnectError("refused"))
    with pytest.raises(fc.APIConnectionError):
        make_client(max_retries=2).health()
    assert len(server.calls("GET", "/healthz")) == 3


def test_unsupported_protocol_is_not_retried(make_client, server, sleeps):
    server.on("GET", "/healthz", httpx.UnsupportedProtocol("nope"))
    with pytest.raises(fc.APIConnectionError):
        make_client(max_retries=3).health()
    assert len(server.calls("GET", "/healthz")) == 1


@pytest.mark.parametrize("failure", [envelope(503, None), envelope(429, None), httpx.ConnectError("refused")])
def test_activate_is_never_retried(make_client, server, sleeps, failure):
    server.on("POST", "/models/2/activate", failure, httpx.Response(200, json={"live": 2}))
    with pytest.raises(fc.APIError):
        make_client(max_retries=5).activate(2)
    assert len(server.calls("POST", "/models/2/activate")) == 1
    assert sleeps.delays == []


def test_readiness_probe_is_not_retried(make_client, server, sleeps):
    server.on("GET", "/readyz", envelope(503, "not_ready", **{"Retry-After": "1"}))
    assert make_client(max_retries=5).ready() is False
    assert len(server.calls("GET", "/readyz")) == 1


def test_predict_is_retried_as_idempotent(make_client, server, sleeps):
    server.on("POST", "/predict", envelope(429, "queue_full"), httpx.Response(200, json=prediction_body(1)))
    result = make_client().predict([b"\x89PNG\r\n\x1a\nfake"])
    assert result.labels == ["robin-0"]
    calls = server.calls("POST", "/predict")
    assert len(calls) == 2
    assert multipart_parts(calls[0]) == multipart_parts(calls[1])  # the same images and fields both times


def test_retry_after_seconds_is_honoured(make_client, server, sleeps):
    server.on(
        "GET",
        "/models",
        envelope(429, "queue_full", **{"Retry-After": "3"}),
        envelope(503, "not_ready", **{"Retry-After": "0.25"}),
        OK_MODELS,
    )
    make_client(max_retries=2).models()
    assert sleeps.delays == [3.0, 0.25]


def test_retry_after_http_date_is_honoured(make_client, server, sleeps):
    when = datetime.now(timezone.utc) + timedelta(seconds=30)
    server.on("GET", "/models", envelope(503, None, **{"Retry-After": format_datetime(when, usegmt=True)}), OK_MODELS)
    make_client().models()
    assert len(sleeps.delays) == 1
    assert 27.0 <= sleeps.delays[0] <= 30.0


def test_retry_after_beyond_the_limit_ends_retrying(make_client, server, sleeps):
    server.on("GET", "/models", envelope(503, None, **{"Retry-After": "3600"}), OK_MODELS)
    with pytest.raises(fc.ServiceUnavailableError) as info:
        make_client(retry=RetryPolicy(max_retries=3, max_retry_after=60)).models()
    assert info.value.retry_after == 3600.0
    assert len(server.calls("GET", "/models")) == 1 and sleeps.delays == []


def test_backoff_is_exponential_with_full_jitter(make_client, server, sleeps):
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:  # always the ceiling: shows the exponential envelope
            return b

    policy = RetryPolicy(max_retries=5, initial_backoff=0.5, max_backoff=4.0, rng=Top())
    server.on("GET", "/models", envelope(502, None))
    with pytest.raises(fc.InternalServerError):
        make_client(retry=policy).models()
    assert sleeps.delays == [0.5, 1.0, 2.0, 4.0, 4.0]


def test_jitter_stays_within_the_envelope():
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=8.0, rng=random.Random(0))
    for retry in range(6):
        ceiling = min(8.0, 2.0**retry)
        values = [policy.backoff(retry) for _ in range(200)]
        assert all(0.0 <= v <= ceiling for v in values)
        assert max(values) > 0.7 * ceiling and min(values) < 0.3 * ceiling  # spread over the whole range


def test_parse_retry_after():
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-3") == 0.0
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:10 GMT", now=now) == 10.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after("") is None
    assert parse_retry_after(None) is None
    assert parse_retry_after("nan") is None


def test_policy_validates():
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_submit_retry_reuses_one_idempotency_key(make_client, server, sleeps, tmp_path):
    (tmp_path / "birds" / "robin").mkdir(parents=True)
    (tmp_path / "birds" / "robin" / "1.png").write_bytes(b"png-bytes-1")
    accepted = httpx.Response(202, json={"id": "t1", "status": "queued", "url": "/tasks/t1"})
    server.on("POST", "/tasks", httpx.ConnectError("reset"), envelope(503, None), accepted)
    submitted = make_client(admin_key="adm").submit_task(tmp_path / "birds", name="birds")
    assert submitted.id == "t1" and submitted.replayed is False
    calls = server.calls("POST", "/tasks")
    assert len(calls) == 3
    keys = {c.headers["idempotency-key"] for c in calls}
    assert len(keys) == 1 and len(next(iter(keys))) == 36  # one uuid4 for every attempt
    assert multipart_parts(calls[0]) == multipart_parts(calls[2])  # the same archive bytes re-sent
    assert form_fields(calls[-1]) == {"name": "birds", "kind": "class"}


def test_submit_retry_against_an_idempotent_server_creates_one_task(make_client, server, sleeps, tmp_path):
    """A server that stored the task but whose answer was lost: the retry gets the stored task back."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"x")
    stored: dict[str, str] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        key = request.headers["idempotency-key"]
        replay = key in stored
        stored.setdefault(key, f"task-{len(stored) + 1}")
        if not replay:
            raise httpx.ReadError("connection reset after the server stored the task")
        body = {"id": stored[key], "status": "queued"}
        return httpx.Response(200, json=body, headers={"Idempotent-Replayed": "true"})

    server.on("POST", "/tasks", handler)
    submitted = make_client().submit_task(tmp_path, name="a")
    assert submitted.id == "task-1" and submitted.replayed is True
    assert len(stored) == 1


def test_explicit_idempotency_key_is_sent(make_client, server, tmp_path):
    archive = tmp_path / "t.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    server.on("POST", "/tasks", httpx.Response(202, json={"id": "t9", "status": "queued"}))
    make_client().submit_task(archive, name="t", kind="domain", idempotency_key="my-key")
    assert server.requests[-1].headers["idempotency-key"] == "my-key"
    assert form_fields(server.requests[-1]) == {"name": "t", "kind": "domain"}


def test_each_submission_gets_a_fresh_key(make_client, server, tmp_path):
    archive = tmp_path / "t.zip"
    archive.write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    server.on("POST", "/tasks", httpx.Response(202, json={"id": "t9", "status": "queued"}))
    client = make_client()
    client.submit_task(archive, name="t")
    client.submit_task(archive, name="t")
    first, second = (r.headers["idempotency-key"] for r in server.calls("POST", "/tasks"))
    assert first != second

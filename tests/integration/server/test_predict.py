"""POST /predict through TestClient: both body forms, every option, every refusal (4xx, never 5xx)."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from fmlora.errors import VersionNotFoundError
from fmlora.model.prompts import PromptChoice
from server.core.errors import NoModelError, QueueFullError, RequestTimeoutError, VersionUnavailableError

from .conftest import FakeEngine, assert_envelope, png_bytes, publish_fake_version


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a tiny (invalid) body: a decompression bomb's shape."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def jpeg_bytes(size: tuple[int, int] = (16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 120, 30)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def client(make_client, registry):
    publish_fake_version(registry, ["pets", "birds"])
    return make_client()


def test_json_predict_returns_one_result_per_image_in_order(client):
    images = [png_bytes(color=(0, 0, 0)), png_bytes(color=(255, 255, 255)), png_bytes(color=(1, 1, 1))]
    r = client.post("/predict", json={"images": [b64(i) for i in images], "top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == 1
    assert body["snapshot_sha256"] == f"{1:064x}"
    assert len(body["results"]) == 3
    # The fake engine's label depends on the image's mean: order is preserved image by image.
    assert [res["predictions"][0]["label"] for res in body["results"]] == ["cat", "cat", "dog"]
    assert all(len(res["predictions"]) == 2 for res in body["results"])
    assert body["results"][0]["predictions"][0] == {"label": "cat", "score": 0.5, "task": "pets"}
    assert body["results"][0]["prompt"] == {"mode": "auto", "task": "pets", "weights": {"pets": 1.0}}


def test_images_reach_the_engine_decoded_as_rgb_arrays(client):
    engine = client.app.state.fmlora.engine
    r = client.post("/predict", json={"images": [b64(png_bytes((7, 5))), b64(jpeg_bytes((3, 4)))]})
    assert r.status_code == 200
    assert engine.calls[-1]["shapes"] == [(5, 7, 3), (4, 3, 3)]
    assert engine.calls[-1]["top_k"] == 5 and engine.calls[-1]["prompt"] == PromptChoice("auto")


def test_data_url_prefix_is_accepted(client):
    r = client.post("/predict", json={"images": ["data:image/png;base64," + b64(png_bytes())]})
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("auto", PromptChoice("auto")),
        ("none", PromptChoice("none")),
        ({"task": "birds"}, PromptChoice("task", "birds")),
    ],
)
def test_prompt_forms_reach_the_engine(client, prompt, expected):
    r = client.post("/predict", json={"images": [b64(png_bytes())], "prompt": prompt})
    assert r.status_code == 200, r.text
    assert client.app.state.fmlora.engine.calls[-1]["prompt"] == expected


def test_multipart_predict_with_form_fields(client):
    files = [("images", ("a.png", png_bytes(), "image/png")), ("images", ("b.jpg", jpeg_bytes(), "image/jpeg"))]
    r = client.post("/predict", files=files, data={"top_k": "1", "prompt": '{"task": "pets"}', "version": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 2 and all(len(res["predictions"]) == 1 for res in body["results"])
    call = client.app.state.fmlora.engine.calls[-1]
    assert call["prompt"] == PromptChoice("task", "pets") and call["version"] == 2 and call["top_k"] == 1


@pytest.mark.parametrize("prompt", ["auto", "none", '"none"'])
def test_multipart_prompt_keywords(client, prompt):
    r = client.post("/predict", files=[("images", ("a.png", png_bytes(), "image/png"))], data={"prompt": prompt})
    assert r.status_code == 200, r.text
    assert client.app.state.fmlora.engine.calls[-1]["prompt"] == PromptChoice(prompt.strip('"'))


def test_one_by_one_image_is_fine(client):
    r = client.post("/predict", json={"images": [b64(png_bytes((1, 1)))]})
    assert r.status_code == 200


@pytest.mark.parametrize(
    ("payload", "error_type"),
    [
        (b"\x00\x01garbage" * 50, "invalid_image"),
        (jpeg_bytes((64, 64))[:200], "invalid_image"),
        (b"", "invalid_image"),
        (png_header_only(20000, 20000), "image_too_large"),
    ],
    ids=["random-bytes", "truncated-jpeg", "empty", "20000x20000-png-header"],
)
def test_bad_images_are_4xx_and_the_server_stays_ready(client, payload, error_type):
    status = 413 if error_type == "image_too_large" else 400
    r = client.post("/predict", json={"images": [b64(png_bytes()), b64(payload)]})
    error = assert_envelope(r, status, error_type)
    assert error["message"].startswith("images[1]: ")
    r = client.post("/predict", files=[("images", ("x.bin", payload, "application/octet-stream"))])
    assert_envelope(r, status, error_type)
    assert client.get("/readyz").status_code == 200
    assert client.post("/predict", json={"images": [b64(png_bytes())]}).status_code == 200


@pytest.mark.parametrize("text", ["not base64!!", "QUJD=", "data:image/png,AAAA", "%%%%"])
def test_wrong_base64_is_400(client, text):
    assert_envelope(client.post("/predict", json={"images": [text]}), 400, "invalid_image")


def test_huge_json_is_413_before_it_is_read(make_client, registry):
    publish_fake_version(registry, ["pets"])
    client = make_client(max_body_bytes=64 * 1024)
    big = {"images": [b64(png_bytes())], "pad": "x" * 200_000}
    assert_envelope(client.post("/predict", json=big), 413, "payload_too_large")

    # Without a Content-Length (chunked), the limit trips while streaming.
    def chunks():
        for _ in range(100):
            yield b" " * 4096

    r = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert_envelope(r, 413, "payload_too_large")
    assert client.get("/readyz").status_code == 200


def test_deeply_nested_json_is_4xx(client):
    body = ("[" * 100_000) + ("]" * 100_000)
    r = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    error = assert_envelope(r, 422, "validation_error")
    assert "recursion" in error["message"] and client.get("/readyz").status_code == 200


def test_too_many_images_is_413(make_client, registry):
    publish_fake_version(registry, ["pets"])
    client = make_client(max_images_per_request=2)
    img = b64(png_bytes())
    assert_envelope(client.post("/predict", json={"images": [img] * 3}), 413, "too_many_images")
    files = [("images", (f"{i}.png", png_bytes(), "image/png")) for i in range(3)]
    assert_envelope(client.post("/predict", files=files), 413, "too_many_images")
    assert client.post("/predict", json={"images": [img] * 2}).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"images": []},
        {"images": ["x"], "top_k": 0},
        {"images": ["x"], "top_k": 100000},
        {"images": ["x"], "prompt": "sometimes"},
        {"images": ["x"], "prompt": {"task": ""}},
        {"images": ["x"], "prompt": {"task": "a", "extra": 1}},
        {"images": ["x"], "version": 0},
        {"images": ["x"], "unexpected": True},
        {"images": "x"},
        {},
    ],
)
def test_invalid_json_fields_are_422_with_details(client, body):
    r = client.post("/predict", json=body)
    error = assert_envelope(r, 422, "validation_error")
    assert error["details"] and all(d["loc"][0] == "body" for d in error["details"])
    assert "input" not in error["details"][0]


def test_malformed_json_is_422(client):
    r = client.post("/predict", content=b"{not json", headers={"Content-Type": "application/json"})
    assert_envelope(r, 422, "validation_error")


@pytest.mark.parametrize(
    ("data", "files"),
    [
        ({"top_k": "abc"}, True),
        ({"prompt": "{broken"}, True),
        ({"version": "-3"}, True),
        ({"colour": "red"}, True),
        ({"top_k": "3"}, False),
    ],
)
def test_invalid_multipart_fields_are_422(client, data, files):
    parts = [("images", ("a.png", png_bytes(), "image/png"))] if files else [("other", ("a.txt", b"x", "text/plain"))]
    r = client.post("/predict", files=parts, data=data)
    assert_envelope(r, 422)


def test_unknown_task_prompt_is_422(client):
    r = client.post("/predict", json={"images": [b64(png_bytes())], "prompt": {"task": "fish"}})
    error = assert_envelope(r, 422, "unknown_task")
    assert "fish" in error["message"]


def test_unsupported_media_type_is_415(client):
    r = client.post("/predict", content=b"hello", headers={"Content-Type": "text/plain"})
    assert_envelope(r, 415, "unsupported_media_type")
    assert_envelope(client.post("/predict"), 415, "unsupported_media_type")


def test_malformed_multipart_is_400(client):
    r = client.post("/predict", content=b"--x\r\nnonsense", headers={"Content-Type": "multipart/form-data"})
    assert_envelope(r, 400, "bad_request")


def test_pinning_an_unknown_version_is_404(client):
    r = client.post("/predict", json={"images": [b64(png_bytes())], "version": 99})
    assert_envelope(r, 404, "version_not_found")


@pytest.mark.parametrize(
    ("exc", "status", "error_type", "retry_after"),
    [
        (QueueFullError("the queue is full", retry_after=2.2), 429, "queue_full", "3"),
        (NoModelError("no task has been learned yet"), 503, "no_model", "5"),
        (RequestTimeoutError("took too long"), 504, "timeout", None),
        (VersionUnavailableError("v3 is corrupt"), 409, "version_unavailable", None),
        (VersionNotFoundError("version 7 does not exist"), 404, "version_not_found", None),
    ],
)
def test_engine_errors_map_to_status_and_retry_after(make_client, registry, exc, status, error_type, retry_after):
    publish_fake_version(registry, ["pets"])
    engine = FakeEngine(registry=registry, raise_on_predict=exc)
    client = make_client(engine=engine)
    r = client.post("/predict", json={"images": [b64(png_bytes())]})
    assert_envelope(r, status, error_type)
    assert r.headers.get("retry-after") == retry_after
    assert client.get("/readyz").status_code == 200


def test_slow_engine_times_out_with_504(make_client, registry):
    publish_fake_version(registry, ["pets"])
    client = make_client(engine=FakeEngine(registry=registry, delay_s=5.0), request_timeout_s=0.2)
    r = client.post("/predict", json={"images": [b64(png_bytes())]})
    assert_envelope(r, 504, "timeout")


def test_not_ready_is_503_with_retry_after(make_client, registry):
    client = make_client(engine=FakeEngine(registry=registry, start_delay_s=1.0), wait=False)
    r = client.post("/predict", json={"images": [b64(png_bytes())]})
    assert_envelope(r, 503, "not_ready")
    assert r.headers["retry-after"] == "1"


def test_unexpected_engine_error_is_a_500_without_its_text(make_client, registry, caplog):
    engine = FakeEngine(registry=registry, raise_on_predict=RuntimeError("secret detail at /srv/key"))
    client = make_client(engine=engine)
    with caplog.at_level("ERROR", logger="fmlora.server"):
        r = client.post("/predict", json={"images": [b64(png_bytes())]}, headers={"X-Request-ID": "trace-42"})
    error = assert_envelope(r, 500, "internal_error")
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert error["request_id"] == "trace-42"
    assert any("trace-42" in rec.getMessage() and rec.exc_info for rec in caplog.records)
    assert client.get("/readyz").status_code == 200


def test_large_json_bodies_are_parsed_off_the_event_loop(client, monkeypatch):
    """Megabytes of JSON and base64 must not hold the event loop (and with it every other request)."""
    import asyncio

    from server.api.routes import predict as predict_route

    on_loop: list[bool] = []
    real = predict_route._parse_json

    def spy(body, limit):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return real(body, limit)

    monkeypatch.setattr(predict_route, "_parse_json", spy)
    small = {"images": [b64(png_bytes())]}
    big = {"images": [b64(png_bytes((512, 512), (1, 2, 3), fmt="BMP"))] * 2}
    assert len(json_bytes(big)) > predict_route.INLINE_JSON_BYTES
    assert client.post("/predict", json=small).status_code == 200
    assert client.post("/predict", json=big).status_code == 200
    assert on_loop == [True, False]


def json_bytes(value) -> bytes:
    import json

    return json.dumps(value).encode()

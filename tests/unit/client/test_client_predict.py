"""predict: request shapes (multipart and JSON), batching in order, per-batch versions, validation."""

from __future__ import annotations

import base64
import json

import fmlora_client as fc
import httpx
import numpy as np
import pytest

from .mock_server import form_fields, json_body, multipart_parts, prediction_body


def _answer_per_image(version_of_call=lambda i: 3):
    """A handler answering one result per image it received, labelled with the image's bytes."""
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        version = version_of_call(calls["n"])
        calls["n"] += 1
        if request.headers["content-type"].startswith("application/json"):
            images = [base64.b64decode(s) for s in json_body(request)["images"]]
        else:
            images = [payload for name, filename, payload in multipart_parts(request) if name == "images"]
        body = {
            "model_version": version,
            "snapshot_sha256": f"sha-{version}",
            "results": [{"predictions": [{"label": img.decode(), "score": 1.0, "task": "t"}]} for img in images],
        }
        return httpx.Response(200, json=body)

    return handler


def test_multipart_request_shape(make_client, server):
    server.on("POST", "/predict", httpx.Response(200, json=prediction_body(2)))
    client = make_client(api_key="k")
    result = client.predict([b"\x89PNG\r\n\x1a\none", b"\xff\xd8\xffjpeg"], top_k=3)
    request = server.requests[-1]
    assert request.url.path == "/predict"
    assert request.headers["authorization"] == "Bearer k"
    parts = multipart_parts(request)
    images = [(filename, payload) for name, filename, payload in parts if name == "images"]
    assert images == [("image-0.png", b"\x89PNG\r\n\x1a\none"), ("image-1.jpg", b"\xff\xd8\xffjpeg")]
    assert form_fields(request) == {"top_k": "3", "prompt": "auto"}
    assert isinstance(result, fc.Prediction)
    assert result.model_version == 3 and result.snapshot_sha256 == "sha-3"
    assert result.labels == ["robin-0", "robin-1"]
    assert result.results[0].top == fc.Label(label="robin-0", score=0.9, task="birds")
    assert result.results[0].prompt.weights == {"birds": 1.0}


def test_multipart_task_prompt_and_version(make_client, server):
    server.on("POST", "/predict", httpx.Response(200, json=prediction_body(1, version=2)))
    make_client().predict(b"\x89PNG", prompt={"task": "birds"}, version=2)
    fields = form_fields(server.requests[-1])
    assert json.loads(fields["prompt"]) == {"task": "birds"}
    assert fields["version"] == "2"


def test_json_request_shape(make_client, server):
    server.on("POST", "/predict", httpx.Response(200, json=prediction_body(2)))
    make_client().predict([b"\x89PNG-a", b"\x89PNG-b"], top_k=1, prompt="none", version=4, encoding="json")
    request = server.requests[-1]
    assert request.headers["content-type"] == "application/json"
    body = json_body(request)
    assert body == {
        "images": [base64.b64encode(b"\x89PNG-a").decode(), base64.b64encode(b"\x89PNG-b").decode()],
        "top_k": 1,
        "prompt": "none",
        "version": 4,
    }


def test_json_omits_version_when_not_pinned(make_client, server):
    server.on("POST", "/predict", httpx.Response(200, json=prediction_body(1)))
    make_client().predict(b"\x89PNG", encoding="json")
    assert "version" not in json_body(server.requests[-1])


@pytest.mark.parametrize("encoding", ["multipart", "json"])
def test_batches_keep_input_order(make_client, server, encoding):
    server.on("POST", "/predict", _answer_per_image())
    images = [f"img-{i:02d}".encode() for i in range(23)]
    result = make_client().predict(images, batch_size=5, encoding=encoding)
    assert len(server.calls("POST", "/predict")) == 5
    assert result.labels == [f"img-{i:02d}" for i in range(23)]


def test_each_result_keeps_the_version_of_its_batch(make_client, server):
    server.on("POST", "/predict", _answer_per_image(lambda call: 3 if call < 2 else 4))
    result = make_client().predict([f"{i}".encode() for i in range(6)], batch_size=2)
    assert [r.model_version for r in result.results] == [3, 3, 3, 3, 4, 4]
    assert [r.snapshot_sha256 for r in result.results] == ["sha-3"] * 4 + ["sha-4"] * 2
    assert result.model_versions == [3, 4] and result.mixed_versions
    assert result.model_version == 4  # the version serving when the call finished


def test_single_request_results_carry_its_version(make_client, server):
    server.on("POST", "/predict", httpx.Response(200, json=prediction_body(2, version=7)))
    result = make_client().predict([b"a", b"b"])
    assert [r.model_version for r in result.results] == [7, 7]
    assert not result.mixed_versions


def test_numpy_batch_is_split_into_images(make_client, server):
    server.on("POST", "/predict", httpx.Response(200, json=prediction_body(3)))
    make_client().predict(np.zeros((3, 8, 8, 3), dtype=np.uint8))
    images = [p for p in multipart_parts(server.requests[-1]) if p[0] == "images"]
    assert len(images) == 3 and all(payload.startswith(b"\x89PNG") for _, _, payload in images)


def test_result_count_mismatch_is_a_validation_error(make_client, server):
    server.on("POST", "/predict", httpx.Response(200, json=prediction_body(1)))
    with pytest.raises(fc.APIResponseValidationError, match="sent 2 images but got 1"):
        make_client().predict([b"a", b"b"])


def test_extra_fields_are_kept(make_client, server):
    body = prediction_body(1)
    body["latency_ms"] = 12
    body["results"][0]["predictions"][0]["novel"] = True
    server.on("POST", "/predict", httpx.Response(200, json=body))
    result = make_client().predict(b"a")
    assert result.model_extra == {"latency_ms": 12}
    assert result.results[0].predictions[0].model_extra == {"novel": True}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 0},
        {"top_k": True},
        {"batch_size": 0},
        {"version": -1},
        {"version": 0},
        {"version": "3"},
        {"prompt": 5},
        {"encoding": "xml"},
        {"max_batch_bytes": 0},
    ],
)
def test_bad_arguments_fail_before_sending(make_client, server, kwargs):
    with pytest.raises(fc.InvalidInputError):
        make_client().predict(b"\x89PNG", **kwargs)
    assert server.requests == []


def test_no_images(make_client, server):
    with pytest.raises(fc.InvalidInputError, match="at least one image"):
        make_client().predict([])
    assert server.requests == []


def test_error_in_a_later_batch_is_raised(make_client, server):
    server.on(
        "POST",
        "/predict",
        httpx.Response(200, json=prediction_body(2)),
        httpx.Response(400, json={"error": {"type": "invalid_image", "message": "images[1]: not an image"}}),
    )
    with pytest.raises(fc.BadRequestError, match="not an image"):
        make_client().predict([b"a", b"b", b"c", b"d"], batch_size=2)

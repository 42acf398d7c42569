"""Every failed response becomes its typed exception: the envelope's type first, then the status."""

from __future__ import annotations

import fmlora_client as fc
import httpx
import pytest
from fmlora_client.errors import class_for, status_error_from_response

from .mock_server import envelope

STATUS_CLASSES = [
    (400, fc.BadRequestError),
    (401, fc.AuthenticationError),
    (403, fc.PermissionDeniedError),
    (404, fc.NotFoundError),
    (409, fc.ConflictError),
    (413, fc.PayloadTooLargeError),
    (415, fc.UnsupportedMediaTypeError),
    (422, fc.UnprocessableEntityError),
    (429, fc.RateLimitError),
    (500, fc.InternalServerError),
    (501, fc.InternalServerError),
    (502, fc.InternalServerError),
    (503, fc.ServiceUnavailableError),
    (504, fc.GatewayTimeoutError),
    (599, fc.InternalServerError),
]


def _response(status: int, error_type: str | None = None, **kwargs) -> httpx.Response:
    response = envelope(status, error_type, **kwargs)
    response.request = httpx.Request("GET", "http://fmlora.test/x")
    return response


@pytest.mark.parametrize(("status", "cls"), STATUS_CLASSES)
def test_each_status_maps_to_its_class_without_a_type(status, cls):
    error = status_error_from_response(_response(status))
    assert type(error) is cls
    assert error.status_code == status
    assert isinstance(error, fc.APIStatusError) and isinstance(error, fc.FmloraClientError)


@pytest.mark.parametrize(("status", "cls"), STATUS_CLASSES)
def test_each_status_maps_through_the_client(make_client, server, status, cls):
    server.on("GET", "/models", envelope(status, None, "went wrong", "rid-42"))
    client = make_client(max_retries=0)
    with pytest.raises(cls) as info:
        client.models()
    error = info.value
    assert type(error) is cls
    assert error.status_code == status
    assert error.request_id == "rid-42"
    assert error.message == "went wrong"
    assert error.body == {"error": {"message": "went wrong", "request_id": "rid-42"}}


@pytest.mark.parametrize(
    ("status", "error_type", "cls"),
    [
        (400, "queue_full", fc.RateLimitError),  # the type wins over the status
        (500, "task_not_found", fc.NotFoundError),
        (422, "version_state", fc.ConflictError),
        (400, "no_model", fc.ServiceUnavailableError),
        (502, "invalid_image", fc.BadRequestError),
        (409, "version_unavailable", fc.ConflictError),
        (422, "archive_too_large", fc.PayloadTooLargeError),
        (413, "too_many_images", fc.PayloadTooLargeError),
        (400, "unsupported_archive", fc.UnsupportedMediaTypeError),
        (400, "invalid_class_layout", fc.UnprocessableEntityError),
        (400, "unknown_task", fc.UnprocessableEntityError),
        (400, "timeout", fc.GatewayTimeoutError),
        (400, "Snapshot-Not-Found", fc.NotFoundError),  # suffix family, normalised spelling
        (404, "something_new", fc.NotFoundError),  # unknown type: the status decides
        (418, "teapot", fc.APIStatusError),  # unknown type and status: the base class
    ],
)
def test_envelope_type_wins_over_status(status, error_type, cls):
    error = status_error_from_response(_response(status, error_type))
    assert type(error) is cls
    assert error.type == error_type
    assert error.status_code == status


def test_class_for_is_exported_behaviour():
    assert class_for(503, None) is fc.ServiceUnavailableError
    assert class_for(503, "queue_full") is fc.RateLimitError
    assert issubclass(fc.ServiceUnavailableError, fc.InternalServerError)
    assert issubclass(fc.GatewayTimeoutError, fc.InternalServerError)
    assert issubclass(fc.APITimeoutError, fc.APIConnectionError)


def test_message_request_id_and_str():
    error = status_error_from_response(_response(404, "task_not_found", message="no task abc", request_id="r-9"))
    assert str(error) == "404 task_not_found: no task abc (request id r-9)"
    assert error.retry_after is None


def test_request_id_falls_back_to_the_header_and_non_json_bodies_are_kept():
    response = httpx.Response(502, text="<html>Bad Gateway</html>", headers={"X-Request-ID": "from-header"})
    response.request = httpx.Request("GET", "http://fmlora.test/x")
    error = status_error_from_response(response)
    assert type(error) is fc.InternalServerError
    assert error.request_id == "from-header"
    assert error.body == "<html>Bad Gateway</html>"
    assert error.message == "<html>Bad Gateway</html>"
    assert error.type is None


def test_empty_body_uses_the_reason_phrase():
    response = httpx.Response(503)
    response.request = httpx.Request("GET", "http://fmlora.test/x")
    error = status_error_from_response(response)
    assert type(error) is fc.ServiceUnavailableError
    assert error.message == "Service Unavailable"
    assert error.body is None


def test_framework_detail_and_plain_string_errors():
    detail = httpx.Response(422, json={"detail": "field required"})
    detail.request = httpx.Request("GET", "http://fmlora.test/x")
    assert status_error_from_response(detail).message == "field required"
    plain = httpx.Response(409, json={"error": "busy"})
    plain.request = httpx.Request("GET", "http://fmlora.test/x")
    error = status_error_from_response(plain)
    assert type(error) is fc.ConflictError and error.message == "busy"


def test_retry_after_is_exposed_on_the_error(make_client, server):
    server.on("POST", "/models/2/activate", envelope(429, "too_many_requests", **{"Retry-After": "7"}))
    with pytest.raises(fc.RateLimitError) as info:
        make_client().activate(2)
    assert info.value.retry_after == 7.0


def test_connection_and_timeout_errors(make_client, server):
    server.on("GET", "/healthz", httpx.ConnectError("refused"))
    with pytest.raises(fc.APIConnectionError) as info:
        make_client(max_retries=0).health()
    assert not isinstance(info.value, fc.APITimeoutError)
    assert info.value.request is not None and info.value.request.url.path == "/healthz"
    server.on("GET", "/healthz", httpx.ReadTimeout("slow"))
    with pytest.raises(fc.APITimeoutError):
        make_client(max_retries=0).health()


def test_unexpected_success_bodies_raise_validation_errors(make_client, server):
    server.on("GET", "/models", httpx.Response(200, text="not json"))
    with pytest.raises(fc.APIResponseValidationError):
        make_client().models()
    server.on("GET", "/tasks/t1", httpx.Response(200, json={"unexpected": True}))
    with pytest.raises(fc.APIResponseValidationError) as info:
        make_client().get_task("t1")
    assert info.value.body == {"unexpected": True}
    server.on("GET", "/tasks", httpx.Response(200, json={"items": []}))
    with pytest.raises(fc.APIResponseValidationError):
        make_client().list_tasks()


def test_invalid_input_error_is_also_a_value_error():
    assert issubclass(fc.InvalidInputError, ValueError)
    assert issubclass(fc.InvalidInputError, fc.FmloraClientError)
    assert issubclass(fc.WaitTimeoutError, TimeoutError)


def test_invalid_request_is_a_422_family_error():
    """The server's engine answers ``invalid_request`` with 422; the type must not turn it into a 400."""
    assert type(status_error_from_response(_response(422, "invalid_request"))) is fc.UnprocessableEntityError

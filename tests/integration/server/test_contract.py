"""The SDK and the server agree: every error type the server answers with maps to the client exception of
its status family, and every field the server's response schemas document is a typed field of the
client's model (not just an "extra" the client happens to keep)."""

from __future__ import annotations

import pytest
from fmlora_client import models as client_models
from fmlora_client.errors import class_for

from server.api import errors as server_errors
from server.api import schemas
from server.core import errors as errors_core


def test_api_errors_must_be_declared_with_their_status():
    """Every ApiError type is declared in ROUTE_ERRORS (which the contract below checks): raising an
    undeclared type, or a declared one with another status, fails at once."""
    assert server_errors.ApiError(413, "too_many_images", "x").error_type == "too_many_images"
    with pytest.raises(ValueError, match="not declared"):
        server_errors.ApiError(418, "teapot", "short and stout")
    with pytest.raises(ValueError, match="not declared"):
        server_errors.ApiError(400, "payload_too_large", "a declared type under another status")


def _engine_errors() -> list[tuple[int, str]]:
    found, todo = [], [errors_core.EngineError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        found.append((cls.status_code, cls.error_type))
    return found


SERVER_ERRORS = sorted(
    {(status, name) for name, status in server_errors.ROUTE_ERRORS.items()}
    | set(_engine_errors())
    | set(server_errors.LIBRARY_ERRORS.values())
    | {(status, name) for status, name in server_errors._STATUS_TYPES.items()}
)


@pytest.mark.parametrize(("status", "error_type"), SERVER_ERRORS, ids=[f"{s}-{t}" for s, t in SERVER_ERRORS])
def test_every_server_error_type_maps_to_its_status_family(status, error_type):
    assert class_for(status, error_type) is class_for(status, None)


PAIRS = [
    (schemas.PredictResponse, client_models.Prediction),
    (schemas.ImageResultOut, client_models.ImageResult),
    (schemas.LabelScore, client_models.Label),
    (schemas.PromptUsed, client_models.PromptInfo),
    (schemas.TaskAccepted, client_models.TaskSubmission),
    (schemas.TaskOut, client_models.TaskInfo),
    (schemas.VersionOut, client_models.VersionInfo),
    (schemas.ModelsResponse, client_models.ModelsInfo),
    (schemas.ActivateResponse, client_models.Activation),
    (schemas.HealthResponse, client_models.Health),
    (schemas.InfoResponse, client_models.Info),
]


@pytest.mark.parametrize(("server_model", "client_model"), PAIRS, ids=[s.__name__ for s, _ in PAIRS])
def test_client_models_type_every_documented_field(server_model, client_model):
    missing = set(server_model.model_fields) - set(client_model.model_fields)
    assert not missing, f"{client_model.__name__} lacks {sorted(missing)} of {server_model.__name__}"

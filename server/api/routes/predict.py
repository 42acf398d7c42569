"""POST /predict: JSON (base64 images) or multipart (image files), micro-batched on the engine."""

from __future__ import annotations

import asyncio
import binascii
import json
from base64 import b64decode
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from fmlora.model.prompts import PromptChoice
from server.api.auth import require_api_key
from server.api.errors import ApiError
from server.api.routes._common import get_state, media_type, parse_multipart
from server.api.schemas import ErrorEnvelope, PredictForm, PredictRequest, PredictResponse
from server.core.errors import EngineError, InvalidImageInput, RequestTimeoutError
from server.core.images import decode_image
from server.core.results import Prediction

router = APIRouter(tags=["predict"])

_PROMPT_DOC = "'auto' (default), 'none', or a JSON object such as {\"task\": \"birds\"}."

_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["images"],
                    "properties": {
                        "images": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "One or more image files (JPEG, PNG, WebP, BMP, GIF, TIFF).",
                        },
                        "top_k": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 5},
                        "prompt": {"type": "string", "default": "auto", "description": _PROMPT_DOC},
                        "version": {"type": "integer", "minimum": 1, "description": "Pin a published version."},
                    },
                }
            },
        },
    }
}


def _e(description: str) -> dict[str, Any]:
    return {"model": ErrorEnvelope, "description": description}


def _validation_error(exc: ValidationError, prefix: tuple[str, ...] = ("body",)) -> RequestValidationError:
    return RequestValidationError([{**e, "loc": (*prefix, *e["loc"])} for e in exc.errors()])


def _b64(index: int, text: str) -> bytes:
    if text.startswith("data:"):
        header, sep, text = text.partition(",")
        if not sep or not header.endswith(";base64"):
            raise InvalidImageInput(f"images[{index}]: a data URL must be 'data:<type>;base64,<data>'")
    try:
        return b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageInput(f"images[{index}]: not valid base64") from None


def _parse_prompt(raw: str) -> Any:
    raw = raw.strip()
    if raw in ("auto", "none", ""):
        return raw or "auto"
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise RequestValidationError(
            [{"loc": ("body", "prompt"), "msg": f"prompt must be {_PROMPT_DOC}", "type": "value_error"}]
        ) from None


# Bodies above this are parsed and base64-decoded in a worker thread: tens of MiB of JSON would hold
# the event loop (every other request, the probes) for tens of milliseconds.
INLINE_JSON_BYTES = 256 * 1024


def _parse_json(body: bytes, limit: int) -> tuple[list[bytes], PredictForm]:
    try:
        parsed = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    if len(parsed.images) > limit:
        raise ApiError(413, "too_many_images", f"{len(parsed.images)} images in one request; the limit is {limit}")
    blobs = [_b64(i, text) for i, text in enumerate(parsed.images)]
    return blobs, PredictForm(top_k=parsed.top_k, prompt=parsed.prompt, version=parsed.version)


async def _read_json(request: Request, limit: int) -> tuple[list[bytes], PredictForm]:
    body = await request.body()
    if len(body) <= INLINE_JSON_BYTES:
        return _parse_json(body, limit)
    return await run_in_threadpool(_parse_json, body, limit)


async def _read_multipart(request: Request, limit: int) -> tuple[list[bytes], PredictForm]:
    form = await parse_multipart(request, max_files=limit, max_fields=8, what="images")
    try:
        fields: dict[str, Any] = {}
        blobs: list[bytes] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "images":
                    raise ApiError(422, "validation_error", f"unexpected file field {key!r}; send images as 'images'")
                blobs.append(await value.read())
            elif key == "images":
                raise ApiError(422, "validation_error", "'images' must be file parts (with a filename)")
            elif key in fields:
                raise ApiError(422, "validation_error", f"form field {key!r} given twice")
            else:
                fields[key] = _parse_prompt(value) if key == "prompt" else value
    finally:
        await form.close()
    if not blobs:
        raise RequestValidationError(
            [{"loc": ("body", "images"), "msg": "at least one image file is required", "type": "missing"}]
        )
    try:
        options = PredictForm.model_validate(fields)
    except ValidationError as exc:
        raise _validation_error(exc) from None
    return blobs, options


def _decode_all(blobs: list[bytes], max_pixels: int) -> list[np.ndarray]:
    arrays = []
    for i, blob in enumerate(blobs):
        try:
            arrays.append(decode_image(blob, max_pixels))
        except EngineError as exc:
            raise type(exc)(f"images[{i}]: {exc.message}") from None
    return arrays


@router.post(
    "/predict",
    response_model=PredictResponse,
    dependencies=[Depends(require_api_key)],
    openapi_extra=_REQUEST_BODY,
    responses={
        400: _e("An image is not valid base64 or not a decodable image."),
        401: _e("Missing or malformed Authorization header, or an unknown key (when FMLORA_API_KEY is set)."),
        404: _e("The pinned version does not exist."),
        409: _e("The pinned version exists but cannot be served."),
        413: _e("Body too large, too many images, or an image has too many pixels."),
        415: _e("Content-Type must be application/json or multipart/form-data."),
        422: _e("Invalid fields, unknown task in the prompt."),
        429: _e("The queue is full; retry after Retry-After seconds."),
        503: _e("Not ready, or no model has been trained yet; retry after Retry-After seconds."),
        504: _e("The request did not complete within FMLORA_REQUEST_TIMEOUT_S."),
    },
)
async def predict(request: Request) -> Response:
    """Classify one or more images. One result per image, in order; every result of one response
    comes from the same version (``model_version``)."""
    state = get_state(request)
    settings = state.settings
    limit = settings.max_images_per_request
    kind = media_type(request)
    state.ensure_ready()  # before reading the body: a 503 should not cost the client its upload
    if kind == "application/json" or kind.endswith("+json"):
        blobs, options = await _read_json(request, limit)
    elif kind == "multipart/form-data":
        blobs, options = await _read_multipart(request, limit)
    else:
        raise ApiError(415, "unsupported_media_type", "POST /predict takes application/json or multipart/form-data")
    engine = state.ensure_ready()
    choice = options.prompt
    prompt = PromptChoice(choice) if isinstance(choice, str) else PromptChoice("task", choice.task)

    async def run() -> Prediction:
        arrays = await run_in_threadpool(_decode_all, blobs, settings.max_image_pixels)
        return await engine.predict(arrays, top_k=options.top_k, prompt=prompt, version=options.version)

    try:
        # The engine enforces the same deadline per request; this one also covers decoding.
        prediction = await asyncio.wait_for(run(), timeout=settings.request_timeout_s)
    except asyncio.TimeoutError:
        raise RequestTimeoutError(
            f"the request did not complete within {settings.request_timeout_s:g} s; retry later or send fewer images"
        ) from None
    state.metrics.images.inc(len(blobs))
    # Validated once here and serialised once: returning the model would make FastAPI validate and
    # serialise it a second time through response_model (which stays for the OpenAPI schema).
    body = PredictResponse.model_validate(prediction.to_dict()).model_dump_json()
    return Response(content=body, media_type="application/json")

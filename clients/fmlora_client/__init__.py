"""fmlora_client: the Python SDK for an fmlora server. Imports only httpx, anyio and pydantic.

from fmlora_client import Client

with Client("http://127.0.0.1:8000", admin_key="...") as client:
    task = client.submit_task("birds/", name="birds")          # one sub-folder per class
    client.wait_for_task(task.id, until="live")                 # read-your-writes
    print(client.predict(["robin.jpg"], top_k=3).results[0].predictions)
"""

from ._config import DEFAULT_BASE_URL, DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, ClientSettings
from ._retry import RetryPolicy
from ._version import __version__
from .async_client import AsyncClient
from .client import Client
from .errors import (
    APIConnectionError,
    APIError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    FmloraClientError,
    GatewayTimeoutError,
    InternalServerError,
    InvalidInputError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    ServiceUnavailableError,
    TaskFailedError,
    TaskRejectedError,
    UnprocessableEntityError,
    UnsupportedMediaTypeError,
    WaitTimeoutError,
)
from .models import (
    Activation,
    Health,
    ImageResult,
    Info,
    Label,
    ModelsInfo,
    Prediction,
    PromptInfo,
    TaskInfo,
    TaskSubmission,
    VersionInfo,
)

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_MAX_RETRIES",
    "DEFAULT_TIMEOUT",
    "APIConnectionError",
    "APIError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "Activation",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "Client",
    "ClientSettings",
    "ConflictError",
    "FmloraClientError",
    "GatewayTimeoutError",
    "Health",
    "ImageResult",
    "Info",
    "InternalServerError",
    "InvalidInputError",
    "Label",
    "ModelsInfo",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "Prediction",
    "PromptInfo",
    "RateLimitError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "TaskFailedError",
    "TaskInfo",
    "TaskRejectedError",
    "TaskSubmission",
    "UnprocessableEntityError",
    "UnsupportedMediaTypeError",
    "VersionInfo",
    "WaitTimeoutError",
    "__version__",
]

"""The error tree. Each error knows its HTTP status and its OpenAI error type/code, so that the
mapping to a response lives in exactly one place (api/errors.py reads these attributes)."""
from __future__ import annotations


class BatchdError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class InvalidRequest(BatchdError):
    status, type, code = 400, "invalid_request_error", "invalid_value"


class Unauthorized(BatchdError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class ModelNotFound(BatchdError):
    status, type, code = 404, "invalid_request_error", "model_not_found"


class NotFound(BatchdError):
    status, type, code = 404, "invalid_request_error", "not_found"


class PayloadTooLarge(BatchdError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class UnsupportedMediaType(BatchdError):
    status, type, code = 415, "invalid_request_error", "unsupported_media_type"


class Overloaded(BatchdError):
    """Admission refused; the message says why and Retry-After says when to come back."""
    status, type, code = 429, "rate_limit_error", "queue_full"


class NotReady(BatchdError):
    status, type, code = 503, "server_error", "not_ready"


class ShuttingDown(BatchdError):
    status, type, code = 503, "server_error", "shutting_down"


class EngineDead(BatchdError):
    """The model worker can no longer run: everything pending fails fast, /health turns 503."""
    status, type, code = 503, "server_error", "engine_dead"


class DeadlineExceeded(BatchdError):
    status, type, code = 504, "timeout_error", "deadline_exceeded"


class ClientDisconnected(BatchdError):
    """The client went away; nobody reads this answer (499 as nginx logs it)."""
    status, type, code = 499, "invalid_request_error", "client_disconnected"


class InferenceFailed(BatchdError):
    """The model raised on this input alone (after bisecting its batch); internals stay hidden."""
    status, type, code = 500, "server_error", "inference_failed"


class FatalBackendError(Exception):
    """Raised by a backend when the device is unusable (not one input's fault): the engine dies."""

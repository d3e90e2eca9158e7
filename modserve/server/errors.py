"""Every failure the API can return, as OpenAI-shaped errors with the matching status.

Messages are for clients: they name the field at fault, never a file path or the text of
an internal exception (the server log has those).
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from modserve.engine.base import (
    EngineDeadError,
    EngineError,
    EngineNotReadyError,
    PackUnavailableError,
    QueueFullError,
)
from modserve.server.responses import ErrorDetail, ErrorResponse

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}
RETRY_AFTER_S = {429: 1, 503: 5}  # when a client may try again


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        detail = ErrorDetail(
            message=self.message, type=ERROR_TYPES.get(self.status, "server_error"), param=self.param, code=self.code
        )
        return ErrorResponse(error=detail).model_dump()

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = dict(headers or {})
        if self.status in RETRY_AFTER_S:
            headers.setdefault("Retry-After", str(RETRY_AFTER_S[self.status]))
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def from_engine_error(err: EngineError, prompt_param: str) -> ApiError:
    """Engine refusals to statuses; the engine names fields, the server knows which endpoint."""
    if isinstance(err, QueueFullError):
        return ApiError(429, str(err), None, err.code)
    if isinstance(err, EngineNotReadyError | PackUnavailableError | EngineDeadError):
        return ApiError(503, str(err), None, err.code)
    if type(err) is EngineError:
        return ApiError(500, str(err), None, err.code)
    param = prompt_param if err.param in (None, "prompt") else err.param
    return ApiError(400, str(err), param, err.code)

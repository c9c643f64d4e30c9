"""What went wrong, as an HTTP status and a one-line message; each dialect renders it in its own shape.

Errors a user can cause become 4xx with a message that says what to do; the engine's own failures
become 500 or 503. Nothing here writes a traceback: a request's mistake is not the server's.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException

from runtime.engine import DeviceLost, EngineFailure, LoraError, PromptTooLongError, QueueFullError
from runtime.errors import LlamaboxError

log = logging.getLogger("llamabox")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    @property
    def kind(self) -> str:
        """OpenAI's and llama.cpp's error type for this status."""
        return KINDS.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")


KINDS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    503: "unavailable_error",
}


def as_api_error(exc: Exception) -> ApiError:
    """Any exception from serving a request, as the error to answer with."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFullError):
        return ApiError(503, str(exc), headers={"Retry-After": "1"})
    if isinstance(exc, DeviceLost):
        return ApiError(503, str(exc), headers={"Retry-After": "5"})
    if isinstance(exc, EngineFailure):
        return ApiError(500, f"llama.cpp failed to evaluate the request ({exc})")
    if isinstance(exc, PromptTooLongError):
        return ApiError(400, str(exc), param="prompt")
    if isinstance(exc, LoraError):
        return ApiError(400, str(exc), param="lora")
    if isinstance(exc, LlamaboxError):
        return ApiError(400, str(exc))
    if isinstance(exc, HTTPException):
        return ApiError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))
    log.exception("llamabox: internal error")  # a bug of ours: the traceback is for us
    return ApiError(500, f"internal error ({type(exc).__name__}); see the server's log")

"""Errors as HTTP responses, in OpenAI's error shape, in one place."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from runtime.engine import EngineFailure, QueueFullError
from runtime.errors import LlamaboxError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_response(status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status, headers=headers)


async def on_api_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.message, exc.param)


async def on_user_error(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(400, str(exc))


async def on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    return error_response(exc.status_code, exc.detail)


async def on_queue_full(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(503, str(exc), headers={"Retry-After": "1"})


async def on_engine_failure(_request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, f"llama.cpp failed to evaluate the request ({exc})")


HANDLERS = {
    ApiError: on_api_error,
    QueueFullError: on_queue_full,
    EngineFailure: on_engine_failure,
    LlamaboxError: on_user_error,
    HTTPException: on_http_error,
}

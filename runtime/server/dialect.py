"""A dialect: a family of routes that share one error shape.

Each API family (OpenAI, Anthropic, llama.cpp, Ollama) is a module with a `DIALECT` and its
routes; `Dialect.route` wraps each endpoint so that whatever it raises is answered in the family's
own error JSON, which is what its clients parse.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.server.errors import ApiError, as_api_error

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True)
class Dialect:
    name: str
    error_body: Callable[[ApiError], object]

    def error(self, error: ApiError) -> Response:
        return JSONResponse(self.error_body(error), status_code=error.status, headers=error.headers)

    def route(self, path: str, endpoint: Endpoint, methods: list[str]) -> Route:
        async def answer(request: Request) -> Response:
            try:
                return await endpoint(request)
            except Exception as exc:  # every failure becomes this dialect's error JSON
                return self.error(as_api_error(exc))

        answer.__name__ = endpoint.__name__
        return Route(path, answer, methods=methods)


def openai_error(error: ApiError) -> object:
    """OpenAI's error object, also what llama-server answers on its OpenAI routes."""
    return {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": None}}


OPENAI = Dialect("openai", openai_error)

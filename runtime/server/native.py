"""llama.cpp's own server API, as llama-server and llamafile expose it: /health, /props, /slots, ...

Code written for llamafile's or llama-server's native routes works unchanged against a bundle.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.engine import Engine
from runtime.server.dialect import Dialect
from runtime.server.errors import ApiError
from runtime.server.settings import ServerSettings


def llama_cpp_error(error: ApiError) -> object:
    """llama-server's error JSON: OpenAI's fields, with the HTTP status as the code."""
    return {"error": {"code": error.status, "message": error.message, "type": error.kind}}


NATIVE = Dialect("llama.cpp", llama_cpp_error)


def routes() -> list[Route]:
    return [
        NATIVE.route("/health", health, ["GET"]),
        NATIVE.route("/props", props, ["GET"]),
        NATIVE.route("/slots", list_slots, ["GET"]),
    ]


async def health(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    slots, waiting = engine.slots()
    busy = sum(slot.is_processing for slot in slots)
    return JSONResponse({"status": "ok", "slots_idle": len(slots) - busy, "slots_processing": busy, "requests_waiting": waiting})


async def list_slots(request: Request) -> Response:
    """One object per slot."""
    engine: Engine = request.app.state.engine
    slots, _ = engine.slots()
    return JSONResponse([{"id": s.id, "n_ctx": s.n_ctx, "is_processing": s.is_processing, "cached_tokens": s.cached_tokens} for s in slots])


async def props(request: Request) -> Response:
    """Like llama-server's /props, plus what hardware the runtime detected and uses."""
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    defaults = settings.defaults
    generation: dict[str, Any] = {"temperature": defaults.temperature, "n_predict": defaults.max_tokens or -1}
    return JSONResponse(
        {
            "model_alias": settings.model_id,
            "n_ctx": engine.n_ctx,
            "total_slots": engine.parallel,
            "chat_template": engine.chat_template or "",
            "default_generation_settings": generation,
            "hardware": settings.hardware,
        }
    )

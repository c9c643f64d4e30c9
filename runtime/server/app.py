"""The Starlette application: the chat page, /health and the API dialects."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from runtime.engine import Engine
from runtime.server import openai
from runtime.server.errors import HANDLERS
from runtime.server.settings import ServerSettings


def create_app(engine: Engine, settings: ServerSettings) -> Starlette:
    async def index(_request: Request) -> Response:
        return FileResponse(settings.ui_dir / "index.html")

    async def health(_request: Request) -> Response:
        slots, waiting = engine.slots()
        busy = sum(slot.is_processing for slot in slots)
        return JSONResponse({"status": "ok", "slots_idle": len(slots) - busy, "slots_processing": busy, "requests_waiting": waiting})

    async def list_slots(_request: Request) -> Response:
        """Like llama-server's /slots: one object per slot."""
        slots, _ = engine.slots()
        return JSONResponse([{"id": s.id, "n_ctx": s.n_ctx, "is_processing": s.is_processing, "cached_tokens": s.cached_tokens} for s in slots])

    async def props(_request: Request) -> Response:
        """Like llama-server's /props, plus what hardware the runtime detected and uses."""
        return JSONResponse(
            {
                "model_alias": settings.model_id,
                "n_ctx": engine.n_ctx,
                "chat_template": engine.chat_template or "",
                "default_generation_settings": {"temperature": settings.temperature, "n_predict": settings.n_predict or -1},
                "hardware": settings.hardware,
            }
        )

    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/props", props, methods=["GET"]),
            Route("/slots", list_slots, methods=["GET"]),
            *openai.routes(),
            Mount("/ui", StaticFiles(directory=settings.ui_dir), name="ui"),
        ],
        exception_handlers=HANDLERS,  # type: ignore[arg-type]
    )
    app.state.engine = engine
    app.state.settings = settings
    return app

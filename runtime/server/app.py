"""The Starlette application: the chat page, /health and the API dialects.

Each dialect is a module with its routes; adding one is one line in `create_app`.
"""

from __future__ import annotations

import dataclasses
import mimetypes

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from runtime import __version__
from runtime.engine import Engine
from runtime.server import anthropic, native, ollama, openai, responses
from runtime.server.device_loss import DeviceLossAnswers
from runtime.server.errors import as_api_error
from runtime.server.guard import Guard, error_shape
from runtime.server.settings import ServerSettings

# Starlette guesses a file's type from the system's tables (the registry on Windows, which can say
# text/plain for .js): browsers refuse ES modules not served as JavaScript.
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/css", ".css")


def create_app(engine: Engine, settings: ServerSettings) -> Starlette:
    async def index(_request: Request) -> Response:
        return FileResponse(settings.ui_dir / "index.html")

    async def info(_request: Request) -> Response:
        """Everything the chat page shows about this server: the model, its defaults, the hardware."""
        defaults = settings.defaults
        return JSONResponse(
            {
                "model": {"id": settings.model_id, **dataclasses.asdict(settings.model)},
                "n_ctx": engine.n_ctx,
                "slots": engine.parallel,
                "shared_cache": engine.cache.shared,  # the slots share n_ctx tokens, rather than each having them
                "system_prompt": settings.system_prompt or "",
                "defaults": {"temperature": defaults.temperature, "top_p": defaults.top_p, "top_k": defaults.top_k,
                             "min_p": defaults.min_p, "max_tokens": defaults.max_tokens},
                "hardware": settings.hardware,
                "version": __version__,
                "api_key_required": bool(settings.access.api_keys),
            }
        )

    async def not_found(request: Request, exc: Exception) -> Response:
        """An unknown route or method, in the error shape of the API family its path belongs to."""
        error = as_api_error(exc)
        return JSONResponse(error_shape(request.url.path)(error), status_code=error.status, headers=error.headers)

    # The chat page, unless --no-webui: then / is an unknown route, as llama-server's without its web UI.
    page = [Route("/", index, methods=["GET"]), Mount("/ui", StaticFiles(directory=settings.ui_dir), name="ui")]
    app = Starlette(
        routes=[
            *(page[:1] if settings.endpoints.webui else []),
            Route("/llamabox/info", info, methods=["GET"]),
            *openai.routes(),
            *responses.routes(),
            *anthropic.routes(),
            *native.routes(),
            *ollama.routes(),
            *(page[1:] if settings.endpoints.webui else []),
        ],
        exception_handlers={HTTPException: not_found},
        middleware=[
            Middleware(Guard, access=settings.access),
            *([Middleware(DeviceLossAnswers, engine=engine)] if settings.devices_can_drop else []),
        ],
    )
    app.state.engine = engine
    app.state.settings = settings
    return app

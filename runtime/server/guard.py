"""Who may talk to the server: the Host check, the API key, CORS and the access log, as one ASGI middleware.

Pure ASGI (not BaseHTTPMiddleware) so that streamed answers pass through untouched. In order:
1. The Host header must name this server: an IP address, `localhost`, or a name given with
   --allowed-host. A web page that rebinds its own DNS name to 127.0.0.1 sends its own name as the
   Host, so it gets a 403 instead of the model's answers (DNS rebinding, as in Ollama's CVE-2024-28224).
   An IP literal cannot be rebound: the browser only sends the name it resolved. A request without
   a Host header (HTTP/1.0) does not come from a browser and passes.
2. CORS, as llama-server does for local origins: pages served from localhost, 127.0.0.1 or [::1] (any port,
   such as a front end in development) may call the API; other origins only when given with --cors.
   Starlette's CORSMiddleware answers the preflight.
3. With --api-key, every route but the chat page, its files and /health wants the key, as
   `Authorization: Bearer KEY` (OpenAI, llama.cpp, Ollama clients) or `x-api-key: KEY` (Anthropic's).
The refusals are answered in the error shape of the API family the path belongs to, which is what
that family's clients parse. With --verbose, each request is one line on stderr.
"""

from __future__ import annotations

import hmac
import ipaddress
import time
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.server.access_log import REQUEST_TOKENS, RequestTokens, log_line
from runtime.server.anthropic import ANTHROPIC
from runtime.server.dialect import OPENAI
from runtime.server.errors import ApiError
from runtime.server.native import NATIVE
from runtime.server.ollama import OLLAMA
from runtime.server.settings import Access

OPEN_PATHS = ("/", "/health", "/v1/health")  # the chat page and the health checks need no key
OPEN_PREFIX = "/ui/"  # the chat page's files
LOCAL_NAMES = ("localhost",)
LOCAL_ORIGINS = r"https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?"


class Guard:
    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app, self.access = app, access
        self._keys = [key.encode() for key in access.api_keys]
        self._allowed = {name for name in map(host_name, access.allowed_hosts) if name}
        self._inner = CORSMiddleware(
            self._authorized,
            allow_origins=list(access.cors_origins),
            allow_origin_regex=LOCAL_ORIGINS,
            allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
            allow_headers=["*"],
            allow_private_network=True,  # Chrome asks before a public page may call a local server
            expose_headers=["Retry-After"],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if not self.access.access_log:
            await self._checked(scope, receive, send)
            return
        started, status, tokens = time.perf_counter(), [0], RequestTokens()

        async def noting_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        reset = REQUEST_TOKENS.set(tokens)
        try:
            await self._checked(scope, receive, noting_status)
        except BaseException:
            status[0] = status[0] or 500
            raise
        finally:
            REQUEST_TOKENS.reset(reset)
            log_line(scope, status[0], tokens, time.perf_counter() - started)

    async def _checked(self, scope: Scope, receive: Receive, send: Send) -> None:
        host = Headers(scope=scope).get("host")
        if host is not None and not self._host_allowed(host):
            name = host_name(host) or host
            message = f"requests for the host '{name}' are refused (against DNS rebinding); if you reach this server by that name, start it with --allowed-host {name}"
            await refuse(scope, receive, send, ApiError(403, message))
            return
        await self._inner(scope, receive, send)

    async def _authorized(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._keys or _is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = _key_in(Headers(scope=scope))
        if given is None:
            message = "this server wants an API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY' (the key it was started with, --api-key)"
        elif not any([hmac.compare_digest(given, key) for key in self._keys]):  # a list: every key compared, always
            message = "wrong API key: send the key the server was started with (--api-key)"
        else:
            await self.app(scope, receive, send)
            return
        await refuse(scope, receive, send, ApiError(401, message, headers={"WWW-Authenticate": "Bearer"}))

    def _host_allowed(self, host: str) -> bool:
        name = host_name(host)
        if name is None:
            return False
        if name in LOCAL_NAMES or name in self._allowed or "*" in self._allowed:
            return True
        try:
            ipaddress.ip_address(name.split("%")[0])  # an IPv6 literal may carry a zone
        except ValueError:
            return False
        return True


def host_name(host: str) -> str | None:
    """The name in a Host header (or --allowed-host), lower case, without port or IPv6 brackets; None if malformed."""
    host = host.strip().lower()
    if host.startswith("["):
        name, bracket, rest = host[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        return name
    if host.count(":") > 1:  # a bare IPv6 address, as --allowed-host may give it
        return host
    name, colon, port = host.partition(":")
    if colon and not port.isdigit():
        return None
    return name.removesuffix(".") or None


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIX) or path == OPEN_PREFIX.rstrip("/")


def _key_in(headers: Headers) -> bytes | None:
    """The key a request sends, as bytes (compared in constant time), or None."""
    authorization = headers.get("authorization", "")
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip().encode("latin-1")
    key = headers.get("x-api-key", "").strip()
    return key.encode("latin-1") if key else None


# --- refusals, in the shape of the path's API family ----------------------------------------------


def error_shape(path: str) -> Callable[[ApiError], object]:
    """Which family's error JSON a path is answered in."""
    if path.startswith("/api/"):
        return OLLAMA.error_body
    if path == "/v1/messages" or path.startswith("/v1/messages/"):
        return ANTHROPIC.error_body
    if path.startswith("/v1/"):
        return OPENAI.error_body
    return NATIVE.error_body


async def refuse(scope: Scope, receive: Receive, send: Send, error: ApiError) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": error.message[:120]})
        return
    body = error_shape(scope["path"])(error)
    await JSONResponse(body, status_code=error.status, headers=error.headers)(scope, receive, send)

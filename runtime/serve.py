"""Serving: bind the port, print where, open the browser, run uvicorn until Ctrl+C."""

from __future__ import annotations

import os
import socket
import sys
import threading
import webbrowser
from dataclasses import dataclass

import click
import uvicorn

from runtime.engine import Engine
from runtime.errors import LlamaboxError
from runtime.server.app import create_app
from runtime.server.settings import ServerSettings

PORT_ATTEMPTS = 20


def bind(host: str, port: int, explicit: bool) -> socket.socket:
    """A listening socket on host:port; if the port was not chosen by the user, the next free one."""
    candidates = [port] if explicit else range(port, port + PORT_ATTEMPTS)
    for candidate in candidates:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        if sys.platform != "win32":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as exc:
            sock.close()
            if explicit:
                raise LlamaboxError(f"cannot listen on {host}:{candidate} ({exc.strerror}); choose another with --port") from None
            continue
        sock.listen(128)
        return sock
    raise LlamaboxError(f"ports {port}-{port + PORT_ATTEMPTS - 1} on {host} are all taken; choose one with --port")


@dataclass(frozen=True)
class Listeners:
    """The sockets the server answers on: the main port, and the Ollama port if asked for."""

    main: socket.socket
    ollama: socket.socket | None

    @classmethod
    def open(cls, host: str, port: int, explicit: bool, ollama_port: int | None) -> Listeners:
        main = bind(host, port, explicit)
        if ollama_port is None:
            return cls(main, None)
        try:
            return cls(main, bind(host, ollama_port, explicit=True))
        except LlamaboxError as exc:
            main.close()
            raise LlamaboxError(str(exc).replace("--port", "--ollama-port")) from None

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.main, self.ollama] if self.ollama else [self.main]


def url_of(sock: socket.socket, scheme: str = "http") -> str:
    """How a browser reaches this socket: 0.0.0.0 and :: as 127.0.0.1, IPv6 addresses in brackets."""
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"{scheme}://[{shown}]:{port}/" if ":" in shown else f"{scheme}://{shown}:{port}/"


def _open_browser(url: str) -> None:
    try:
        webbrowser.open(url)
    except Exception:  # no usable browser: the URL is printed above, and that is enough
        pass


def has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve(engine: Engine, settings: ServerSettings, listeners: Listeners, open_browser: bool) -> None:
    tls = settings.access.tls
    scheme = "https" if tls else "http"
    url = url_of(listeners.main, scheme)
    click.echo(f"llamabox: {settings.model_id} is ready")
    if settings.endpoints.webui:
        click.echo(f"  chat:       {url}")
    else:
        click.echo(f"  server:     {url}  (no chat page: --no-webui)")
    click.echo(f"  OpenAI API: {url}v1  (also Anthropic /v1/messages, llama.cpp /completion, Ollama /api)")
    if listeners.ollama is not None:
        click.echo(f"  Ollama API: {url_of(listeners.ollama, scheme)}api")
    click.echo("  press Ctrl+C to stop")
    if open_browser and has_display():
        threading.Timer(0.5, _open_browser, args=(url,)).start()
    config = uvicorn.Config(
        create_app(engine, settings), log_level="warning", access_log=False, lifespan="off",
        ssl_keyfile=str(tls.key_file) if tls else None, ssl_certfile=str(tls.cert_file) if tls else None,
    )
    try:
        uvicorn.Server(config).run(sockets=listeners.sockets)
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl+C, then raises it again
        pass
    click.echo("llamabox: stopped", err=True)

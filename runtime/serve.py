"""Serving: bind the port, print where, open the browser, run uvicorn until Ctrl+C."""

from __future__ import annotations

import os
import socket
import sys
import threading
import webbrowser

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


def has_display() -> bool:
    if sys.platform in ("darwin", "win32"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def serve(engine: Engine, settings: ServerSettings, sock: socket.socket, open_browser: bool) -> None:
    host, port = sock.getsockname()[:2]
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    url = f"http://{shown_host}:{port}/"
    click.echo(f"llamabox: {settings.model_id} is ready")
    click.echo(f"  chat:       {url}")
    click.echo(f"  OpenAI API: {url}v1  (press Ctrl+C to stop)")
    if open_browser and has_display():
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    config = uvicorn.Config(create_app(engine, settings), log_level="warning", access_log=False, lifespan="off")
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on Ctrl+C, then raises it again
        pass
    click.echo("llamabox: stopped", err=True)

"""Work in progress: being written in this session."""

from __future__ import annotations

from starlette.routing import Route


def routes() -> list[Route]:
    return []

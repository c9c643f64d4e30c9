"""Work in progress: being written in this session."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from runtime.server.settings import Access


class Guard:
    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app, self.access = app, access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)

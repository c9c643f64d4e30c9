"""When a device the model runs on drops out (an RPC worker), every request still waiting for its answer gets a 503.

The scheduler fails the requests it holds (completions, chats) itself. The rest of the work runs in threads beside it
(embeddings, tokenizing, reranking, slot files): where such a thread waits on llama.cpp for a worker that is gone, it
never returns, and the process is about to start again. This pure-ASGI middleware answers those requests at once in
their API family's error shape, and every new one until the process ends. Installed only where devices can drop
out (--rpc), so that no other server pays for a task per request.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.engine import Engine
from runtime.server.errors import as_api_error
from runtime.server.guard import refuse


class DeviceLossAnswers:
    def __init__(self, app: ASGIApp, engine: Engine) -> None:
        self.app, self.engine = app, engine
        self._lost: asyncio.Event | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.engine.lost is not None:
            await refuse(scope, receive, send, as_api_error(self.engine.lost))
            return
        began, answered = False, False

        async def sending(message: Message) -> None:
            nonlocal began
            if answered:  # the 503 went out instead; what the stuck work says later is dropped
                return
            began = began or message["type"] == "http.response.start"
            await send(message)

        work = asyncio.ensure_future(self.app(scope, receive, sending))
        watch = asyncio.ensure_future(self._lost_event().wait())
        try:
            await asyncio.wait((work, watch), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            work.cancel()
            raise
        finally:
            watch.cancel()
        if work.done() or began:  # answered, or an answer under way (a stream ends with the scheduler's error event)
            await work
            return
        answered = True
        work.add_done_callback(lambda task: task.cancelled() or task.exception())  # no "never retrieved" in the log
        assert self.engine.lost is not None
        await refuse(scope, receive, send, as_api_error(self.engine.lost))

    def _lost_event(self) -> asyncio.Event:
        """Set on this event loop when the engine is told a device is gone (from ggml's thread)."""
        if self._lost is None:
            lost, loop = asyncio.Event(), asyncio.get_running_loop()
            self.engine.when_lost(lambda: loop.call_soon_threadsafe(lost.set))
            self._lost = lost
        return self._lost

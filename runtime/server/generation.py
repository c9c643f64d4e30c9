"""One request's generation, shared by every dialect: started at once, read whole or as a stream.

Starting is eager: a prompt that does not fit, a full queue or a bad setting raises before the
response's first byte, so the dialect can still answer with a 4xx or 503. Reading a stream ends
the generation when the reader stops (a client that disconnects frees its slot), and every count
comes from the engine, so streamed and whole answers report the same usage.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.responses import StreamingResponse

from runtime.engine import Chunk, Completion, Engine, Prompt, Sampling
from runtime.errors import LlamaboxError
from runtime.server.access_log import count_tokens
from runtime.server.errors import ApiError, as_api_error


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    context_dropped: int = 0  # tokens context shifts dropped (--context-shift): said as usage.context_dropped_tokens
    messages_dropped: int = 0  # the chat's oldest messages left out (--truncate-prompt): usage.prompt_messages_dropped

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def timings_of(result: Completion | Chunk) -> dict[str, float]:
    """llama.cpp's `timings` object (llama-server adds it to OpenAI answers too; the chat page shows it)."""
    timings = result.timings
    read = max(result.prompt_tokens - result.cached_tokens, 0)
    prompt_ms, predicted_ms = (timings.prompt_ms, timings.predicted_ms) if timings else (0.0, 0.0)
    drafted = {"draft_n": timings.draft_n, "draft_n_accepted": timings.draft_n_accepted} if timings and timings.draft_n else {}
    return {
        "cache_n": result.cached_tokens,
        "prompt_n": read,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / read if read else 0.0,
        "prompt_per_second": read * 1000 / prompt_ms if prompt_ms else 0.0,
        "predicted_n": result.completion_tokens,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": predicted_ms / result.completion_tokens if result.completion_tokens else 0.0,
        "predicted_per_second": result.completion_tokens * 1000 / predicted_ms if predicted_ms else 0.0,
        **drafted,  # as llama-server: only where a draft model guessed
    }


def usage_of(results: list[Completion] | list[Chunk]) -> Usage:
    """The prompt is read once per choice but counted once, as OpenAI counts it; completions add up."""
    first = results[0]
    return Usage(
        first.prompt_tokens, sum(r.completion_tokens for r in results), first.cached_tokens, sum(r.context_dropped for r in results),
        first.messages_dropped,
    )


def dropped(usage: Usage | Completion | Chunk) -> dict[str, int]:
    """What every dialect's usage object adds where the model did not see the whole conversation (nothing otherwise,
    so that the shapes stay their own): the chat's oldest messages left out of the prompt (--truncate-prompt), and
    the tokens a context shift dropped while replying (--context-shift)."""
    said = {"prompt_messages_dropped": usage.messages_dropped} if usage.messages_dropped else {}
    return {**said, "context_dropped_tokens": usage.context_dropped} if usage.context_dropped else said


class Generation:
    """`n` completions of one prompt, decoded side by side in the engine's slots."""

    def __init__(self, engine: Engine, prompt: Prompt, sampling: Sampling, n: int = 1) -> None:
        self.prompt = prompt
        self._streams: list[Any] = []
        try:
            for i in range(n):
                seed = sampling.seed + i if sampling.seed is not None and i else sampling.seed  # n different answers
                self._streams.append(engine.astream(prompt, _with_seed(sampling, seed)))
        except BaseException:
            self.close()
            raise

    async def result(self) -> list[Completion]:
        """Every choice, whole."""
        pieces: list[list[Chunk]] = [[] for _ in self._streams]
        try:
            async for index, chunk in self.chunks():
                pieces[index].append(chunk)
        finally:
            self.close()
        return [Completion.from_pieces(p) for p in pieces]

    async def chunks(self) -> AsyncIterator[tuple[int, Chunk]]:
        """(choice index, piece) as they come; the last piece of each choice has its finish reason."""
        try:
            if len(self._streams) == 1:
                async for chunk in self._streams[0]:
                    _count(0, chunk)
                    yield 0, chunk
                return
            merged: asyncio.Queue[tuple[int, Chunk] | BaseException | None] = asyncio.Queue()

            async def pump(index: int, stream: Any) -> None:
                try:
                    async for chunk in stream:
                        await merged.put((index, chunk))
                except BaseException as exc:  # handed to the reader, which raises it
                    await merged.put(exc)
                finally:
                    await merged.put(None)

            tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(self._streams)]
            try:
                running = len(tasks)
                while running:
                    item = await merged.get()
                    if item is None:
                        running -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        _count(*item)
                        yield item
            finally:
                for task in tasks:
                    task.cancel()
        finally:
            self.close()

    def close(self) -> None:
        """Cancel whatever is still generating (safe to call twice)."""
        for stream in self._streams:
            stream.close()


def _count(index: int, chunk: Chunk) -> None:
    """A choice's last piece carries its counts: they go to the access log line (the prompt once)."""
    if chunk.finish_reason is not None:
        count_tokens(chunk.prompt_tokens if index == 0 else 0, chunk.completion_tokens)


def _with_seed(sampling: Sampling, seed: int | None) -> Sampling:
    return sampling if seed == sampling.seed else replace(sampling, seed=seed)


Render = Callable[[ApiError], Any]


async def guarded(events: AsyncIterator[Any], on_error: Render) -> AsyncIterator[Any]:
    """Relay events; an engine failure after the first byte becomes one last error event in the stream."""
    try:
        async for event in events:
            yield event
    except LlamaboxError as exc:  # the status line is already sent: say it in the stream (EngineFailure, a dead-end grammar)
        yield on_error(as_api_error(exc))


def sse(events: AsyncIterator[Any], on_error: Render) -> EventSourceResponse:
    """Server-sent events: a str is sent as the data, a ServerSentEvent as is, anything else as JSON."""

    async def encoded() -> AsyncIterator[str | ServerSentEvent]:
        async for event in guarded(events, on_error):
            yield event if isinstance(event, (str, ServerSentEvent)) else json.dumps(event, ensure_ascii=False)

    return EventSourceResponse(encoded(), ping=15, sep="\n")


def ndjson(events: AsyncIterator[Any], on_error: Render) -> StreamingResponse:
    """Newline-delimited JSON, as Ollama streams."""

    async def lines() -> AsyncIterator[str]:
        async for event in guarded(events, on_error):
            yield json.dumps(event, ensure_ascii=False) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")

"""The OpenAI dialect: /v1/models, /v1/chat/completions, /v1/completions, streaming or not.

Translates OpenAI request JSON into the engine's Prompt and Sampling, and engine output back into
OpenAI response JSON. Knows nothing of llama.cpp.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.engine import Engine, EngineFailure, Prompt, Sampling
from runtime.server.errors import ApiError
from runtime.server.settings import ServerSettings


def routes() -> list[Route]:
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]


async def list_models(request: Request) -> Response:
    settings: ServerSettings = request.app.state.settings
    return JSONResponse(
        {
            "object": "list",
            "data": [{"id": settings.model_id, "object": "model", "created": settings.started_at, "owned_by": "llamabox"}],
        }
    )


async def chat_completions(request: Request) -> Response:
    body = await _json_body(request)
    engine: Engine = request.app.state.engine
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    prompt = await run_in_threadpool(engine.chat_prompt, [_plain_message(m) for m in messages])
    return await _respond(request, body, prompt, _ChatShape())


async def completions(request: Request) -> Response:
    body = await _json_body(request)
    engine: Engine = request.app.state.engine
    text = body.get("prompt")
    if isinstance(text, list) and len(text) == 1 and isinstance(text[0], str):
        text = text[0]
    if not isinstance(text, str):
        raise ApiError(400, "'prompt' must be a string", param="prompt")
    prompt = await run_in_threadpool(engine.text_prompt, text)
    return await _respond(request, body, prompt, _TextShape())


class _TextShape:
    """How /v1/completions wraps text."""

    object = "text_completion"
    chunk_object = "text_completion"

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    delta = choice


class _ChatShape:
    """How /v1/chat/completions wraps text."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def choice(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}

    def delta(self, text: str, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


async def _respond(request: Request, body: dict[str, Any], prompt: Prompt, shape: _TextShape | _ChatShape) -> Response:
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    sampling = _sampling(body, settings)
    envelope = {
        "id": f"{'chatcmpl' if isinstance(shape, _ChatShape) else 'cmpl'}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": settings.model_id,
        "system_fingerprint": settings.fingerprint,
    }
    if not body.get("stream"):
        done = await engine.acomplete(prompt, sampling)
        usage = _usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens)
        return JSONResponse({**envelope, "object": shape.object, "choices": [shape.choice(done.text, done.finish_reason)], "usage": usage})

    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "'stream_options' must be an object", param="stream_options")
    include_usage = bool(stream_options.get("include_usage"))
    chunks = engine.astream(prompt, sampling)

    async def events() -> AsyncIterator[str]:
        try:
            if isinstance(shape, _ChatShape):
                yield _event(envelope, shape.chunk_object, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            try:
                async for chunk in chunks:
                    if chunk.text or chunk.finish_reason:
                        yield _event(envelope, shape.chunk_object, [shape.delta(chunk.text, chunk.finish_reason)])
                    if chunk.finish_reason and include_usage:  # the engine's own counts, as in the non-streamed answer
                        yield _event(envelope, shape.chunk_object, [], usage=_usage(chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens))
            except EngineFailure as exc:  # after the first event the status is sent: the error goes in the stream
                yield json.dumps({"error": {"message": f"llama.cpp failed to evaluate the request ({exc})", "type": "server_error", "param": None, "code": None}})
                return
            yield "[DONE]"
        finally:
            chunks.close()  # type: ignore[attr-defined]  # a client that went away frees its slot

    return EventSourceResponse(events(), ping=15)


def _event(envelope: dict[str, Any], obj: str, choices: list[dict[str, Any]], **extra: Any) -> str:
    return json.dumps({**envelope, "object": obj, "choices": choices, **extra}, ensure_ascii=False)


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    """OpenAI content may be a list of parts; the engine takes plain text."""
    content = message.get("content")
    if isinstance(content, list):
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        if not all(isinstance(text, str) for text in texts):
            raise ApiError(400, "each text part of a message needs a string 'text'", param="messages")
        content = "".join(texts)  # type: ignore[arg-type]
    return {**message, "role": message.get("role", "user"), "content": content or ""}


def _sampling(body: dict[str, Any], settings: ServerSettings) -> Sampling:
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise ApiError(400, "'max_tokens' must be a whole number of at least 1 (leave it out for no limit)", param="max_tokens")
    try:
        return Sampling(
            max_tokens=int(max_tokens) if max_tokens is not None else settings.n_predict,
            temperature=float(body.get("temperature", settings.temperature)),
            top_p=float(body.get("top_p", 0.95)),
            top_k=int(body.get("top_k", 40)),
            min_p=float(body.get("min_p", 0.05)),
            presence_penalty=float(body.get("presence_penalty", 0.0)),
            frequency_penalty=float(body.get("frequency_penalty", 0.0)),
            repeat_penalty=float(body.get("repeat_penalty", 1.0)),
            seed=int(body["seed"]) if body.get("seed") is not None else None,
            stop=[str(s) for s in stop],
            logit_bias={int(token): float(bias) for token, bias in (body.get("logit_bias") or {}).items()},
        )
    except (TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise ApiError(400, f"invalid sampling parameter: {exc}") from None

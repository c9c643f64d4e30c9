"""The Anthropic dialect: /v1/messages and /v1/messages/count_tokens, as Anthropic's Messages API.

Translates Anthropic's system prompt, turns and content blocks into the OpenAI-style messages that
chat templates and structured.ToolUse read (tool_use blocks become tool calls, tool_result blocks
tool messages), and the engine's answer back into content blocks, stop reasons, usage and
Anthropic's named server-sent events; generation and usage are generation.py's.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from sse_starlette.sse import ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.engine import Chunk, Completion, Engine, Prompt, Sampling
from runtime.server import sampling as sampling_fields
from runtime.server.body import Body, read_json
from runtime.server.dialect import Dialect
from runtime.server.errors import ApiError
from runtime.server.generation import Generation, Usage, dropped, sse, usage_of
from runtime.server.structured import Tool, ToolUse, json_grammar, new_call_id

MAX_STOP_SEQUENCES = 16

# Anthropic's error type for each status; its clients pick the exception class from the status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error(error: ApiError) -> dict[str, Any]:
    kind = ERROR_TYPES.get(error.status, "invalid_request_error" if error.status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": error.message}}


ANTHROPIC = Dialect("anthropic", anthropic_error)


def routes() -> list[Route]:
    return [
        ANTHROPIC.route("/v1/messages", messages, ["POST"]),
        ANTHROPIC.route("/v1/messages/count_tokens", count_tokens, ["POST"]),
    ]


# --- the request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    """What a create or count_tokens request asks for, read and checked before any generation."""

    model: str
    messages: list[dict[str, Any]]  # OpenAI-style, for the chat template
    prefill: str  # a final assistant turn: the reply continues from it
    tools: ToolUse
    parallel_calls: bool
    grammar: str | None


def _read_request(body: Body) -> _Request:
    model = body.string("model", required=True) or ""
    messages, prefill = conversation(body)
    tools, parallel = tool_use(body)
    grammar = _output_grammar(body)
    if grammar is not None and tools.forced:
        raise ApiError(400, "'output_config.format' and a forced 'tool_choice' cannot be combined", param="output_config")
    if prefill and tools.forced:
        raise ApiError(400, "a final assistant turn (prefill) and a forced 'tool_choice' cannot be combined", param="messages")
    thinking = body.obj("thinking")
    if thinking is not None and thinking.string("type") != "disabled":
        raise thinking.fail("type", "must be disabled: this model has no extended thinking (leave 'thinking' out)")
    if "mcp_servers" in body:
        raise ApiError(400, "'mcp_servers' is not supported: this server connects to no MCP servers; give the tools in 'tools'", param="mcp_servers")
    return _Request(model, messages, prefill, tools, parallel, grammar)


def _prompt(engine: Engine, request: _Request) -> Prompt:
    prompt = request.tools.prompt(engine, request.messages)
    if request.prefill:
        prompt = replace(prompt, tokens=[*prompt.tokens, *engine.tokenize(request.prefill, add_bos=False)])
    return prompt


def conversation(body: Body) -> tuple[list[dict[str, Any]], str]:
    """`system` and `messages` as OpenAI-style chat messages, and the prefill of a final assistant turn."""
    raw = body.array("messages", required=True)
    if not raw or not all(isinstance(m, dict) for m in raw):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    names: dict[str, str] = {}  # tool_use id -> tool name, for the tool_result blocks that answer them
    turns = [_turn(f"messages[{i}].", Body(m, prefix=f"messages[{i}]."), names) for i, m in enumerate(raw)]
    prefill = ""
    last = turns[-1]
    if last[-1]["role"] == "assistant":
        if last[-1].get("tool_calls"):
            raise ApiError(400, "the conversation ends with a tool_use; add a user turn with its tool_result", param="messages")
        prefill = turns.pop()[-1]["content"]
    system = _system(body)
    messages = [{"role": "system", "content": system}] if system else []
    for turn in turns:
        messages.extend(turn)
    return _merged(messages), prefill


def _system(body: Body) -> str:
    """`system`: a string, or a list of text blocks."""
    system = body.raw("system")
    if system is None or isinstance(system, str):
        return system or ""
    if isinstance(system, list) and all(isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in system):
        return "\n\n".join(b["text"] for b in system)
    raise body.fail("system", "must be a string or a list of {type: text, text} blocks")


def _turn(prefix: str, message: Body, names: dict[str, str]) -> list[dict[str, Any]]:
    """One Anthropic turn as OpenAI-style messages: tool results become tool messages, tool uses tool calls."""
    role = message.string("role", required=True)
    if role not in ("user", "assistant"):
        raise message.fail("role", "must be user or assistant (the system prompt goes in 'system')")
    content = message.raw("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise message.fail("content", "must be a string or a list of content blocks")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for j, raw in enumerate(content):
        if not isinstance(raw, dict):
            raise message.fail("content", "blocks must be objects with a 'type'")
        block = Body(raw, prefix=f"{prefix}content[{j}].")
        kind = block.string("type", required=True)
        if kind == "text":
            texts.append(block.string("text", required=True) or "")
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_call(block, names))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_result(block, names))
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue  # echoed back by clients; this model does not think, so there is nothing to read
        elif kind in ("image", "document"):
            raise block.fail("type", f"is '{kind}'; this model reads text only")
        else:
            raise block.fail("type", f"'{kind}' is not a block a {role} turn can hold here (text, tool_use in assistant turns, tool_result in user turns)")
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
        if calls:
            out["tool_calls"] = calls
        return [out]
    return [*results, *([{"role": "user", "content": "".join(texts)}] if texts or not results else [])]


def _tool_call(block: Body, names: dict[str, str]) -> dict[str, Any]:
    call_id, name = block.string("id", required=True) or "", block.string("name", required=True) or ""
    arguments = block.obj("input")
    names[call_id] = name
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments.data if arguments else {}, ensure_ascii=False)}}


def _tool_result(block: Body, names: dict[str, str]) -> dict[str, Any]:
    call_id = block.string("tool_use_id", required=True) or ""
    content = block.raw("content")
    if content is None or isinstance(content, str):
        text = content or ""
    elif isinstance(content, list) and all(isinstance(b, dict) for b in content):
        if any(b.get("type") != "text" or not isinstance(b.get("text"), str) for b in content):
            raise block.fail("content", "may hold text blocks only; this model reads text only")
        text = "".join(b["text"] for b in content)
    else:
        raise block.fail("content", "must be a string or a list of text blocks")
    message = {"role": "tool", "tool_call_id": call_id, "content": f"Error: {text}" if block.boolean("is_error") else text}
    if call_id in names:
        message["name"] = names[call_id]
    return message


def _merged(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Consecutive plain turns of one role joined into one, as Anthropic joins them."""
    out: list[dict[str, Any]] = []
    for message in messages:
        previous = out[-1] if out else None
        plain = message["role"] in ("user", "assistant") and not message.get("tool_calls")
        if previous is not None and plain and previous["role"] == message["role"] and not previous.get("tool_calls"):
            out[-1] = {**previous, "content": "\n\n".join(t for t in (previous["content"], message["content"]) if t)}
        else:
            out.append(message)
    return out


def tool_use(body: Body) -> tuple[ToolUse, bool]:
    """`tools` and `tool_choice` as structured.ToolUse, and whether several calls may come at once."""
    tools = []
    for i, raw in enumerate(body.array("tools") or []):
        if not isinstance(raw, dict):
            raise ApiError(400, f"tools[{i}] must be an object {{name, description, input_schema}}", param="tools")
        tool = Body(raw, prefix=f"tools[{i}].")
        kind = tool.string("type")
        if kind not in (None, "custom"):
            raise tool.fail("type", f"is '{kind}', a server tool; only custom tools {{name, description, input_schema}} run here")
        schema = tool.obj("input_schema", required=True)
        assert schema is not None
        tools.append(Tool(tool.string("name", required=True) or "", tool.string("description") or "", schema.data))
    choice = body.obj("tool_choice")
    if choice is None:
        return ToolUse(tuple(tools), "auto"), True
    kind = choice.string("type", required=True)
    named = {"auto": "auto", "any": "required", "none": "none"}.get(kind or "")
    if kind == "tool":
        named = choice.string("name", required=True)
    if named is None:
        raise choice.fail("type", "must be auto, any, tool or none")
    return ToolUse(tuple(tools), named), not choice.boolean("disable_parallel_tool_use")


def _output_grammar(body: Body) -> str | None:
    """`output_config.format`: a JSON schema the answer is held to (`effort` is a thinking setting: ignored)."""
    config = body.obj("output_config")
    fmt = config.obj("format") if config else None
    if fmt is None:
        return None
    if fmt.string("type") != "json_schema":
        raise fmt.fail("type", "must be json_schema")
    schema = fmt.obj("schema", required=True)
    assert schema is not None
    return json_grammar(schema.data, param="output_config.format.schema")


def request_sampling(body: Body, defaults: Sampling, grammar: str | None) -> tuple[Sampling, list[str]]:
    """The sampling settings, and the stop sequences (whose hit the answer reports)."""
    stops = body.strings("stop_sequences", limit=MAX_STOP_SEQUENCES) or []
    if any(not s for s in stops):
        raise body.fail("stop_sequences", "must not hold empty strings")
    sampling = sampling_fields.override(
        defaults,
        max_tokens=body.integer("max_tokens", minimum=1, required=True),
        temperature=body.number("temperature", minimum=0, maximum=1),
        top_p=body.number("top_p", minimum=0, maximum=1),
        top_k=body.integer("top_k", minimum=0),
        stop=stops or None,
        grammar=grammar,
    )
    return sampling, stops


# --- the answer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    content: list[dict[str, Any]]
    stop_reason: str
    stop_sequence: str | None


def _answer(completion: Completion, request: _Request, stops: list[str]) -> _Answer:
    calls = request.tools.parse(completion.text)
    if calls:
        calls = calls if request.parallel_calls else calls[:1]
        blocks = [{"type": "tool_use", "id": new_call_id("toolu_"), "name": c.name, "input": c.arguments} for c in calls]
        return _Answer(blocks, "tool_use", None)
    text = [{"type": "text", "text": completion.text}] if completion.text else []
    if completion.finish_reason == "length":
        return _Answer(text, "max_tokens", None)
    hit = completion.stop_word if completion.stop_word in stops else None  # not the chat template's own stop strings
    return _Answer(text, "stop_sequence" if hit else "end_turn", hit)


def _usage(usage: Usage) -> dict[str, int]:
    """Anthropic counts prompt tokens read from the cache apart from the input tokens."""
    return {
        "input_tokens": usage.prompt_tokens - usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": usage.cached_tokens,
        **dropped(usage),
    }


def _message(request: _Request, message_id: str, answer: _Answer | None, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": message_id, "type": "message", "role": "assistant", "model": request.model,
        "content": answer.content if answer else [],
        "stop_reason": answer.stop_reason if answer else None,
        "stop_sequence": answer.stop_sequence if answer else None,
        "usage": usage,
    }


# --- endpoints -----------------------------------------------------------------------------------


async def messages(request: Request) -> Response:
    body = await read_json(request)
    engine: Engine = request.app.state.engine
    wanted = _read_request(body)
    sampling, stops = request_sampling(body, request.app.state.settings.defaults, wanted.grammar or wanted.tools.grammar())
    prompt = await run_in_threadpool(_prompt, engine, wanted)
    generation = Generation(engine, prompt, sampling)
    message_id = "msg_" + uuid.uuid4().hex[:24]
    if body.boolean("stream"):
        return sse(_events(generation, wanted, stops, message_id, len(prompt.tokens)), _stream_error)
    [completion] = await generation.result()
    answer = _answer(completion, wanted, stops)
    return JSONResponse(_message(wanted, message_id, answer, _usage(usage_of([completion]))))


async def count_tokens(request: Request) -> Response:
    body = await read_json(request)
    engine: Engine = request.app.state.engine
    prompt = await run_in_threadpool(_prompt, engine, _read_request(body))
    return JSONResponse({"input_tokens": len(prompt.tokens)})


def _event(name: str, **fields: Any) -> ServerSentEvent:
    """A named event whose JSON `type` is its name: Anthropic's clients read only named events."""
    return ServerSentEvent(json.dumps({"type": name, **fields}, ensure_ascii=False), event=name, sep="\n")


def _stream_error(error: ApiError) -> ServerSentEvent:
    return ServerSentEvent(json.dumps(anthropic_error(error), ensure_ascii=False), event="error", sep="\n")


async def _events(generation: Generation, request: _Request, stops: list[str], message_id: str, prompt_tokens: int) -> AsyncIterator[ServerSentEvent]:
    """Anthropic's event order: message_start, each block's start, deltas and stop, message_delta, message_stop.

    Text streams as it comes; with tools offered the answer is held until it is whole, since only
    then is it known to be a tool call (which is sent as one tool_use block with its input).
    """
    start_usage = {"input_tokens": prompt_tokens, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    yield _event("message_start", message=_message(request, message_id, None, start_usage))
    yield _event("ping")
    pieces: list[Chunk] = []
    text_open = False
    async for _, chunk in generation.chunks():
        pieces.append(chunk)
        if chunk.text and not request.tools.active:
            if not text_open:
                text_open = True
                yield _event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            yield _event("content_block_delta", index=0, delta={"type": "text_delta", "text": chunk.text})
    completion = Completion.from_pieces(pieces)
    answer = _answer(completion, request, stops)
    if text_open:
        yield _event("content_block_stop", index=0)
    else:
        for index, block in enumerate(answer.content):
            for event in _whole_block(index, block):
                yield event
    yield _event("message_delta", delta={"stop_reason": answer.stop_reason, "stop_sequence": answer.stop_sequence}, usage=_usage(usage_of([completion])))
    yield _event("message_stop")


def _whole_block(index: int, block: dict[str, Any]) -> list[ServerSentEvent]:
    """A finished block as its start, one delta and its stop."""
    if block["type"] == "tool_use":
        start = {**block, "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"], ensure_ascii=False)}
    else:
        start = {"type": "text", "text": ""}
        delta = {"type": "text_delta", "text": block["text"]}
    return [
        _event("content_block_start", index=index, content_block=start),
        _event("content_block_delta", index=index, delta=delta),
        _event("content_block_stop", index=index),
    ]


"""The OpenAI Responses dialect: POST /v1/responses, stateless.

Translates a Responses request (input items, instructions, function tools, text.format) into the
OpenAI-style chat messages that chat templates and structured.ToolUse read, and the engine's answer
back into output items, a status and the Responses streaming events. Nothing is stored: a request
that refers to an earlier response is refused with a 400 that says to send the whole conversation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from sse_starlette.sse import ServerSentEvent
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.engine import Chunk, Completion, Engine, Sampling
from runtime.server import sampling as sampling_fields
from runtime.server.body import Body, read_json
from runtime.server.dialect import OPENAI
from runtime.server.errors import ApiError
from runtime.server.generation import Generation, Usage, dropped, sse, usage_of
from runtime.server.settings import ServerSettings
from runtime.server.structured import Tool, ToolCall, ToolUse, json_grammar

STATELESS = "this server keeps no responses; send the whole conversation in 'input'"


def routes() -> list[Route]:
    return [
        OPENAI.route("/v1/responses", create_response, ["POST"]),
        OPENAI.route("/v1/responses/{rest:path}", stored_response, ["GET", "POST", "DELETE"]),
    ]


async def stored_response(request: Request) -> Response:
    """Retrieving, cancelling or deleting a response, or listing its input items: nothing is kept."""
    raise ApiError(404, STATELESS)


# --- the request ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    messages: list[dict[str, Any]]  # OpenAI-style, for the chat template
    tools: ToolUse
    parallel_calls: bool
    grammar: str | None
    echo: dict[str, Any]  # the request's settings, as the response object repeats them


def _read_request(body: Body) -> _Request:
    _refuse_state(body)
    tools, tool_list, parallel = tool_use(body)
    grammar, fmt = _text_format(body)
    if grammar is not None and tools.forced:
        raise ApiError(400, "'text.format' and a forced 'tool_choice' cannot be combined", param="text.format")
    metadata = body.obj("metadata")
    echo = {
        "instructions": body.string("instructions"),
        "max_output_tokens": body.integer("max_output_tokens", minimum=1),
        "parallel_tool_calls": parallel,
        "text": {"format": fmt},
        "tool_choice": body.raw("tool_choice") or "auto",
        "tools": tool_list,
        "user": body.string("user"),
        "metadata": metadata.data if metadata else {},
    }
    return _Request(conversation(body), tools, parallel, grammar, echo)


def _refuse_state(body: Body) -> None:
    """Fields that need responses, conversations or prompts kept on the server."""
    if "previous_response_id" in body:
        raise ApiError(400, f"'previous_response_id' is not supported: {STATELESS}", param="previous_response_id")
    if "conversation" in body:
        raise ApiError(400, f"'conversation' is not supported: {STATELESS}", param="conversation")
    if body.boolean("background"):
        raise ApiError(400, "'background' is not supported: this server keeps no responses to poll; leave it out", param="background")
    if "prompt" in body:
        raise ApiError(400, "'prompt' (a stored prompt template) is not supported; send the text in 'instructions' and 'input'", param="prompt")
    if body.integer("top_logprobs", minimum=0) or "message.output_text.logprobs" in (body.array("include") or []):
        raise ApiError(400, "logprobs are not served on /v1/responses; use /v1/chat/completions with 'logprobs'", param="top_logprobs")


def conversation(body: Body) -> list[dict[str, Any]]:
    """`instructions` and `input` (a string, or a list of items) as OpenAI-style chat messages."""
    messages: list[dict[str, Any]] = []
    instructions = body.string("instructions")
    if instructions:
        messages.append({"role": "system", "content": instructions})
    raw = body.raw("input")
    if isinstance(raw, str):
        messages.append({"role": "user", "content": raw})
    elif isinstance(raw, list) and raw:
        names: dict[str, str] = {}  # call_id -> function name, for the outputs that answer the calls
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise ApiError(400, f"input[{i}] must be an object (a message, function_call or function_call_output)", param="input")
            _add_item(messages, Body(item, prefix=f"input[{i}]."), names)
    else:
        raise ApiError(400, "'input' must be a string or a non-empty list of items", param="input")
    return messages


def _add_item(messages: list[dict[str, Any]], item: Body, names: dict[str, str]) -> None:
    kind = item.string("type") or ("message" if "role" in item else None)
    if kind == "message":
        role = item.string("role", required=True)
        if role not in ("user", "assistant", "system", "developer"):
            raise item.fail("role", "must be user, assistant, system or developer")
        messages.append({"role": "system" if role == "developer" else role, "content": _text(item)})
    elif kind == "function_call":
        call_id, name = item.string("call_id", required=True) or "", item.string("name", required=True) or ""
        arguments = item.string("arguments") or "{}"
        names[call_id] = name
        call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        if messages and messages[-1]["role"] == "assistant":  # calls of one turn belong to its assistant message
            messages[-1] = {**messages[-1], "tool_calls": [*messages[-1].get("tool_calls", []), call]}
        else:
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
    elif kind == "function_call_output":
        call_id = item.string("call_id", required=True) or ""
        output = item.raw("output")
        text = output if isinstance(output, str) else _text(item, "output")
        messages.append({"role": "tool", "tool_call_id": call_id, "content": text, **({"name": names[call_id]} if call_id in names else {})})
    elif kind == "reasoning":
        return  # echoed back from an earlier output; this model does not reason apart from its answer
    elif kind == "item_reference":
        raise item.fail("type", f"is item_reference: {STATELESS}")
    else:
        raise item.fail("type", "must be message, function_call or function_call_output (only function tools run here)")


def _text(item: Body, name: str = "content") -> str:
    """A message's content: a string, or a list of text parts (input_text, output_text, refusal)."""
    content = item.raw(name)
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise item.fail(name, "must be a string or a list of content parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text") and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        elif kind in ("input_image", "input_file", "input_audio"):
            raise item.fail(name, f"has an '{kind}' part; this model reads text only")
        else:
            raise item.fail(name, "parts must be {type: input_text, text} objects")
    return "".join(texts)


def tool_use(body: Body) -> tuple[ToolUse, list[dict[str, Any]], bool]:
    """`tools` and `tool_choice` as structured.ToolUse, the tools as the response repeats them, and
    whether several calls may come at once (`parallel_tool_calls`)."""
    tools, listed = [], []
    for i, raw in enumerate(body.array("tools") or []):
        if not isinstance(raw, dict):
            raise ApiError(400, f"tools[{i}] must be a function tool {{type: function, name, parameters}}", param="tools")
        tool = Body(raw, prefix=f"tools[{i}].")
        if tool.string("type") != "function":
            raise tool.fail("type", "must be function: only function tools run on this server")
        parameters = tool.obj("parameters")
        found = Tool(tool.string("name", required=True) or "", tool.string("description") or "", parameters.data if parameters else {})
        tools.append(found)
        listed.append({"type": "function", "name": found.name, "description": found.description or None, "parameters": found.parameters, "strict": tool.boolean("strict")})
    parallel = body.boolean("parallel_tool_calls") is not False
    choice = body.raw("tool_choice")
    if choice is None or choice in ("auto", "none", "required"):
        return ToolUse(tuple(tools), choice or "auto"), listed, parallel
    if not isinstance(choice, dict):
        raise ApiError(400, "'tool_choice' must be auto, none, required, {type: function, name} or {type: allowed_tools, mode, tools}", param="tool_choice")
    named = Body(choice, prefix="tool_choice.")
    kind = named.string("type", required=True)
    if kind == "function":
        return ToolUse(tuple(tools), named.string("name", required=True) or ""), listed, parallel
    if kind == "allowed_tools":
        mode = named.string("mode") or "auto"
        if mode not in ("auto", "required"):
            raise named.fail("mode", "must be auto or required")
        allowed = {t.get("name") for t in named.array("tools", required=True) or [] if isinstance(t, dict)}
        return ToolUse(tuple(t for t in tools if t.name in allowed), mode), listed, parallel
    raise named.fail("type", "must be function or allowed_tools: only function tools run on this server")


def _text_format(body: Body) -> tuple[str | None, dict[str, Any]]:
    """`text.format`: text, json_object or json_schema (flat: name and schema in the format), held by a grammar."""
    text = body.obj("text")
    fmt = text.obj("format") if text else None
    if fmt is None:
        return None, {"type": "text"}
    kind = fmt.string("type", required=True)
    if kind == "text":
        return None, fmt.data
    if kind == "json_object":
        return json_grammar(None, param="text.format"), fmt.data
    if kind == "json_schema":
        schema = fmt.obj("schema", required=True)
        assert schema is not None
        return json_grammar(schema.data, param="text.format.schema"), fmt.data
    raise fmt.fail("type", "must be text, json_object or json_schema")


def request_sampling(body: Body, defaults: Sampling, grammar: str | None) -> Sampling:
    return sampling_fields.override(
        defaults,
        max_tokens=body.integer("max_output_tokens", minimum=1),
        temperature=body.number("temperature", minimum=0, maximum=2),
        top_p=body.number("top_p", minimum=0, maximum=1),
        grammar=grammar,
    )


# --- the answer ----------------------------------------------------------------------------------


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def _message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": [_text_part(text)]}


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _call_item(call: ToolCall, item_id: str, status: str = "completed", arguments: str | None = None) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name, "arguments": call.arguments_json if arguments is None else arguments, "status": status}


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
        **dropped(usage),
    }


class _Reply:
    """One response's id and envelope, and how its output is written, whole or as events."""

    def __init__(self, request: _Request, settings: ServerSettings, sampling: Sampling) -> None:
        self.request = request
        self.id, self.created, self.model = _new_id("resp_"), int(time.time()), settings.model_id
        self.sampling = sampling
        self.sequence = 0

    def calls(self, completion: Completion) -> list[ToolCall]:
        calls = self.request.tools.parse(completion.text)
        return calls if self.request.parallel_calls else calls[:1]

    @staticmethod
    def status(completion: Completion, calls: list[ToolCall]) -> str:
        return "incomplete" if completion.finish_reason == "length" and not calls else "completed"

    def response(self, status: str, output: list[dict[str, Any]], usage: Usage | None) -> dict[str, Any]:
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": self.model, "output": output, "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None}, "store": False,
            "temperature": self.sampling.temperature, "top_p": self.sampling.top_p, "truncation": "disabled",
            **self.request.echo,
            "usage": _usage(usage) if usage else None,
        }

    def whole(self, completion: Completion) -> dict[str, Any]:
        calls = self.calls(completion)
        status = self.status(completion, calls)
        output = [_call_item(c, _new_id("fc_")) for c in calls] or [_message_item(_new_id("msg_"), completion.text, status)]
        return self.response(status, output, usage_of([completion]))

    # --- streaming

    def event(self, kind: str, **fields: Any) -> ServerSentEvent:
        """One event, numbered in order (the clients' stream helpers rely on `sequence_number`)."""
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return ServerSentEvent(json.dumps(data, ensure_ascii=False), event=kind, sep="\n")

    def error(self, error: ApiError) -> ServerSentEvent:
        """A failure after the stream began: the flat error event, which the clients yield without raising."""
        return self.event("error", code="server_error" if error.status >= 500 else "invalid_request", message=error.message, param=error.param)

    async def events(self, generation: Generation) -> AsyncIterator[ServerSentEvent]:
        """response.created, .in_progress, each output item's events, then .completed or .incomplete.

        Text streams as it comes; with tools offered the answer is held until it is whole, since only
        then is it known to be a function call (sent with its arguments in one delta).
        """
        yield self.event("response.created", response=self.response("in_progress", [], None))
        yield self.event("response.in_progress", response=self.response("in_progress", [], None))
        streaming = not self.request.tools.active
        message_id = _new_id("msg_")
        if streaming:
            for event in self._message_opened(message_id):
                yield event
        pieces: list[Chunk] = []
        async for _, chunk in generation.chunks():
            pieces.append(chunk)
            if streaming and chunk.text:
                yield self.event("response.output_text.delta", item_id=message_id, output_index=0, content_index=0, delta=chunk.text, logprobs=[])
        completion = Completion.from_pieces(pieces)
        calls = self.calls(completion)
        status = self.status(completion, calls)
        output = []
        if calls:
            for index, call in enumerate(calls):
                item = _call_item(call, _new_id("fc_"))
                for event in self._call_events(index, item):
                    yield event
                output.append(item)
        else:
            if not streaming:
                for event in self._message_opened(message_id):
                    yield event
                if completion.text:
                    yield self.event("response.output_text.delta", item_id=message_id, output_index=0, content_index=0, delta=completion.text, logprobs=[])
            item = _message_item(message_id, completion.text, status)
            for event in self._message_closed(item, completion.text):
                yield event
            output.append(item)
        final = "response.completed" if status == "completed" else "response.incomplete"
        yield self.event(final, response=self.response(status, output, usage_of([completion])))

    def _message_opened(self, message_id: str) -> list[ServerSentEvent]:
        return [
            self.event("response.output_item.added", output_index=0, item={**_message_item(message_id, "", "in_progress"), "content": []}),
            self.event("response.content_part.added", item_id=message_id, output_index=0, content_index=0, part=_text_part("")),
        ]

    def _message_closed(self, item: dict[str, Any], text: str) -> list[ServerSentEvent]:
        ids = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        return [
            self.event("response.output_text.done", **ids, text=text, logprobs=[]),
            self.event("response.content_part.done", **ids, part=_text_part(text)),
            self.event("response.output_item.done", output_index=0, item=item),
        ]

    def _call_events(self, index: int, item: dict[str, Any]) -> list[ServerSentEvent]:
        ids = {"item_id": item["id"], "output_index": index}
        return [
            self.event("response.output_item.added", output_index=index, item={**item, "arguments": "", "status": "in_progress"}),
            self.event("response.function_call_arguments.delta", **ids, delta=item["arguments"]),
            self.event("response.function_call_arguments.done", **ids, arguments=item["arguments"]),
            self.event("response.output_item.done", output_index=index, item=item),
        ]


# --- the endpoint --------------------------------------------------------------------------------


async def create_response(request: Request) -> Response:
    body = await read_json(request)
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    wanted = _read_request(body)
    sampling = request_sampling(body, settings.defaults, wanted.grammar or wanted.tools.grammar())
    prompt = await run_in_threadpool(wanted.tools.prompt, engine, wanted.messages)
    reply = _Reply(wanted, settings, sampling)
    generation = Generation(engine, prompt, sampling)
    if body.boolean("stream"):
        return sse(reply.events(generation), reply.error)
    [completion] = await generation.result()
    return JSONResponse(reply.whole(completion))

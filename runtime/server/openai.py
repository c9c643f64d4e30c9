"""The OpenAI dialect: /v1/models, /v1/chat/completions, /v1/completions and /v1/embeddings.

Translates OpenAI request JSON into the engine's Prompt and Sampling, and engine output back into
OpenAI response JSON; generation, streaming and usage are generation.py's, grammars structured.py's.
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.engine import Chunk, Completion, Engine, Prompt, Sampling, TokenLogprob
from runtime.engine.templates import RESERVED_NAMES
from runtime.engine import reasoning
from runtime.server import sampling as sampling_fields
from runtime.server.body import Body, read_json
from runtime.server.dialect import OPENAI, openai_error
from runtime.server.errors import ApiError
from runtime.server.generation import Generation, Usage, dropped, sse, timings_of, usage_of
from runtime.server.settings import ServerSettings
from runtime.server.structured import Tool, ToolCall, ToolUse, json_grammar

MAX_N = 8
MAX_TOP_LOGPROBS = 20
MAX_STOP = 16


def routes() -> list[Route]:
    return [
        OPENAI.route("/v1/models", list_models, ["GET"]),
        OPENAI.route("/v1/models/{model:path}", get_model, ["GET"]),
        OPENAI.route("/v1/chat/completions", chat_completions, ["POST"]),
        OPENAI.route("/chat/completions", chat_completions, ["POST"]),  # llama-server answers it without /v1 too
        OPENAI.route("/v1/completions", completions, ["POST"]),
        OPENAI.route("/v1/embeddings", embeddings, ["POST"]),
    ]


def _model_object(settings: ServerSettings) -> dict[str, Any]:
    model = {"id": settings.model_id, "object": "model", "created": settings.started_at, "owned_by": "llamabox"}
    return {**model, "aliases": list(settings.aliases)} if settings.aliases else model


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [_model_object(request.app.state.settings)]})


async def get_model(request: Request) -> Response:
    """Any model name is served by the bundle's model, so every name resolves to it."""
    return JSONResponse(_model_object(request.app.state.settings))


# --- chat ----------------------------------------------------------------------------------------


async def chat_completions(request: Request) -> Response:
    body = await read_json(request)
    engine: Engine = request.app.state.engine
    _refuse_unsupported(body)
    messages = chat_messages(body)
    tools = tool_use(body)
    grammar = response_grammar(body)
    if grammar is not None and tools.forced:
        raise ApiError(400, "'response_format' and a forced 'tool_choice' cannot be combined", param="response_format")
    prompt = await run_in_threadpool(tools.prompt, engine, messages, template_kwargs(body))
    top = _chat_logprobs(body)
    sampling = request_sampling(body, request.app.state.settings.defaults, grammar=grammar or tools.grammar(), logprobs=top)
    reply = _Reply(request, body, "chatcmpl", tools, thinking_open=reasoning.thinking_open(prompt.text))
    generation = Generation(engine, prompt, sampling, n=_n(body))
    if body.boolean("stream"):
        return sse(reply.chat_events(generation, top is not None), _stream_error)
    results = await generation.result()
    choices = [reply.chat_choice(i, r, top is not None) for i, r in enumerate(results)]
    # timings as llama-server adds them (the first choice's): clients written for it read the speed there.
    return JSONResponse({**reply.envelope, "object": "chat.completion", "choices": choices, "usage": _usage(usage_of(results)),
                         "timings": timings_of(results[0])})


def _refuse_unsupported(body: Body) -> None:
    """Fields whose meaning this server cannot give: a 400 that says so, rather than an answer without it."""
    modalities = body.strings("modalities") or []
    if "audio" in body or any(m != "text" for m in modalities):
        raise ApiError(400, "this model answers in text only: leave out 'audio' and non-text 'modalities'", param="modalities")
    if "web_search_options" in body:
        raise ApiError(400, "this server cannot search the web: leave out 'web_search_options'", param="web_search_options")


def template_kwargs(body: Body) -> dict[str, Any]:
    """llama-server's chat_template_kwargs: more variables for the model's chat template (enable_thinking, ...)."""
    given = body.obj("chat_template_kwargs")
    if given is None:
        return {}
    taken = sorted(RESERVED_NAMES & given.data.keys())
    if taken:
        raise given.fail(taken[0], "is the server's to set: leave it out of chat_template_kwargs")
    return dict(given.data)


def chat_messages(body: Body) -> list[dict[str, Any]]:
    messages = body.array("messages", required=True)
    if not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    return [_message(i, Body(m, prefix=f"messages[{i}].")) for i, m in enumerate(messages)]


def _message(index: int, message: Body) -> dict[str, Any]:
    role = message.string("role") or "user"
    if role not in ("system", "developer", "user", "assistant", "tool"):
        raise message.fail("role", "must be system, developer, user, assistant or tool")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": _text_content(message)}
    if role == "assistant" and "tool_calls" in message:
        calls = message.array("tool_calls") or []
        out["tool_calls"] = [_tool_call_in(Body(c, prefix=f"messages[{index}].tool_calls[{j}].")) if isinstance(c, dict) else _bad_call(message) for j, c in enumerate(calls)]
    if role == "tool":
        out["tool_call_id"] = message.string("tool_call_id") or ""
        if "name" in message:
            out["name"] = message.string("name")
    return out


def _bad_call(message: Body) -> dict[str, Any]:
    raise message.fail("tool_calls", "must be a list of {id, type, function: {name, arguments}} objects")


def _tool_call_in(call: Body) -> dict[str, Any]:
    function = call.obj("function", required=True)
    assert function is not None
    arguments = function.raw("arguments")
    if arguments is not None and not isinstance(arguments, (str, dict)):
        raise function.fail("arguments", "must be a JSON string")
    return {"id": call.string("id") or "", "type": "function", "function": {"name": function.string("name", required=True), "arguments": arguments or "{}"}}


def _text_content(message: Body) -> str:
    """OpenAI content: a string, or a list of parts of which the text ones are read."""
    content = message.raw("content")
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise message.fail("content", "must be a string or a list of content parts")
    texts = []
    for part in content:
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise message.fail("content", "parts must be objects with a 'type'")
        if part["type"] in ("text", "input_text", "output_text"):
            if not isinstance(part.get("text"), str):
                raise message.fail("content", "each text part needs a string 'text'")
            texts.append(part["text"])
        else:
            raise message.fail("content", f"has a '{part['type']}' part; this model reads text only")
    return "".join(texts)


def tool_use(body: Body) -> ToolUse:
    if "functions" in body or "function_call" in body:
        raise ApiError(400, "'functions' and 'function_call' are the old form; send 'tools' and 'tool_choice'", param="functions")
    raw_tools = body.array("tools") or []
    tools = []
    for i, raw in enumerate(raw_tools):
        tool = Body(raw, prefix=f"tools[{i}].") if isinstance(raw, dict) else None
        if tool is None or tool.string("type") not in (None, "function"):
            raise ApiError(400, f"tools[{i}] must be a function tool: {{type: function, function: {{name, parameters}}}}", param="tools")
        function = tool.obj("function", required=True)
        assert function is not None
        parameters = function.obj("parameters")
        tools.append(Tool(function.string("name", required=True) or "", function.string("description") or "", parameters.data if parameters else {}))
    choice = body.raw("tool_choice")
    if isinstance(choice, dict):
        named = Body(choice, prefix="tool_choice.").obj("function", required=True)
        assert named is not None
        choice = named.string("name", required=True)
    elif choice is not None and choice not in ("auto", "none", "required"):
        raise ApiError(400, "'tool_choice' must be auto, none, required or {type: function, function: {name}}", param="tool_choice")
    return ToolUse(tuple(tools), choice or "auto")


def response_grammar(body: Body) -> str | None:
    """`response_format`: json_object or json_schema, held by a grammar; text is the default."""
    fmt = body.obj("response_format")
    if fmt is None:
        return None
    kind = fmt.string("type")
    if kind in (None, "text"):
        return None
    if kind == "json_object":
        return json_grammar(None, param="response_format")
    if kind == "json_schema":
        spec = fmt.obj("json_schema", required=True)
        assert spec is not None
        schema = spec.obj("schema")
        return json_grammar(schema.data if schema else {"type": "object"}, param="response_format.json_schema.schema")
    raise fmt.fail("type", "must be text, json_object or json_schema")


def _chat_logprobs(body: Body) -> int | None:
    top = body.integer("top_logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS)
    if not body.boolean("logprobs"):
        if top:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return None
    return top or 0


def _n(body: Body) -> int:
    return body.integer("n", minimum=1, maximum=MAX_N) or 1


def request_sampling(body: Body, defaults: Sampling, *, grammar: str | None, logprobs: int | None) -> Sampling:
    max_tokens = body.integer("max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = body.integer("max_tokens", minimum=1)
    return sampling_fields.override(
        defaults,
        max_tokens=max_tokens,
        temperature=body.number("temperature", minimum=0, maximum=2),
        top_p=body.number("top_p", minimum=0, maximum=1),
        top_k=body.integer("top_k", minimum=0),
        min_p=body.number("min_p", minimum=0, maximum=1),
        presence_penalty=body.number("presence_penalty", minimum=-2, maximum=2),
        frequency_penalty=body.number("frequency_penalty", minimum=-2, maximum=2),
        repeat_penalty=body.number("repeat_penalty", minimum=0),
        seed=sampling_fields.seed(body),
        stop=body.strings("stop", limit=MAX_STOP),
        logit_bias=sampling_fields.logit_bias(body),
        grammar=grammar,
        logprobs=logprobs,
        lora=sampling_fields.lora(body),  # llama-server reads it in OpenAI requests too
    )


class _Reply:
    """What one request's answer shares: its envelope and how its choices are written."""

    def __init__(self, request: Request, body: Body, prefix: str, tools: ToolUse | None = None, thinking_open: bool = False) -> None:
        settings: ServerSettings = request.app.state.settings
        self.tools = tools or ToolUse()
        # llama-server's reasoning_format (the request's, else --reasoning-format): where the reply's thoughts go.
        self.reasoning_format = body.choice("reasoning_format", reasoning.FORMATS) or settings.reasoning_format
        self.thinking_open = thinking_open
        self.envelope = {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_id, "system_fingerprint": settings.fingerprint}
        self.single_call = body.boolean("parallel_tool_calls") is False
        stream_options = body.obj("stream_options")
        self.include_usage = bool(stream_options and stream_options.boolean("include_usage"))

    def chat_choice(self, index: int, result: Completion, logprobs: bool) -> dict[str, Any]:
        thoughts, text = self._split(result.text)
        calls = self.tools.parse(text)[: 1 if self.single_call else None]
        message: dict[str, Any] = {"role": "assistant", "content": None if calls else text, "refusal": None}
        if thoughts:
            message["reasoning_content"] = thoughts
        if calls:
            message["tool_calls"] = [_tool_call_out(call) for call in calls]
        return {"index": index, "message": message, "logprobs": _chat_logprob_list(result.logprobs) if logprobs else None, "finish_reason": "tool_calls" if calls else result.finish_reason}

    async def chat_events(self, generation: Generation, logprobs: bool) -> AsyncIterator[Any]:
        def event(choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
            return {**self.envelope, "object": "chat.completion.chunk", "choices": choices, **extra}

        started, finals, held, splitters = set(), [], {}, {}
        async for index, chunk in generation.chunks():
            if index not in started:
                started.add(index)
                yield event([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}])
            if self.tools.active:  # a tool call is known only when the answer is whole: hold the text
                held.setdefault(index, []).append(chunk)
                if chunk.finish_reason:
                    yield event([self._whole_delta(self.chat_choice(index, Completion.from_pieces(held.pop(index)), logprobs))])
            elif chunk.text or chunk.finish_reason:
                delta = self._delta(splitters, index, chunk)
                lp = _chat_logprob_list(chunk.logprobs) if logprobs else None
                extra = {"timings": timings_of(chunk)} if chunk.finish_reason else {}  # as llama-server: speed for the chat page
                yield event([{"index": index, "delta": delta, "logprobs": lp, "finish_reason": chunk.finish_reason}], **extra)
            if chunk.finish_reason:
                finals.append(chunk)
        if self.include_usage:
            yield event([], usage=_usage(usage_of(finals)))
        yield "[DONE]"

    def _split(self, text: str) -> tuple[str, str]:
        """(reasoning, content) of a whole reply, as its reasoning_format asks."""
        if self.reasoning_format == "none":
            return "", text
        thoughts, answer = reasoning.split(text, self.thinking_open)
        return thoughts, text if self.reasoning_format == "deepseek-legacy" else answer

    def _delta(self, splitters: dict[int, reasoning.Splitter], index: int, chunk: Chunk) -> dict[str, str]:
        """A streamed piece's delta: its reasoning as reasoning_content, the rest as content (a legacy format keeps the
        whole text in content too)."""
        if self.reasoning_format == "none":
            return {"content": chunk.text} if chunk.text else {}
        splitter = splitters.setdefault(index, reasoning.Splitter(self.thinking_open))
        thoughts, answer = splitter.feed(chunk.text, last=chunk.finish_reason is not None)
        if self.reasoning_format == "deepseek-legacy":
            answer = chunk.text
        return {key: value for key, value in (("reasoning_content", thoughts), ("content", answer)) if value}

    @staticmethod
    def _whole_delta(choice: dict[str, Any]) -> dict[str, Any]:
        """A whole answer as one streamed delta (tool calls carry their index in the list)."""
        message = choice.pop("message")
        calls = message.get("tool_calls")
        delta = {"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]} if calls else {"content": message["content"]}
        choice["delta"] = {"reasoning_content": message["reasoning_content"], **delta} if message.get("reasoning_content") else delta
        return choice

    # /v1/completions
    def text_choice(self, index: int, result: Completion, logprobs: bool, offset: int = 0) -> dict[str, Any]:
        return {"index": index, "text": result.text, "logprobs": _text_logprobs(result.logprobs, offset) if logprobs else None, "finish_reason": result.finish_reason}

    async def text_events(self, generation: Generation, logprobs: bool) -> AsyncIterator[Any]:
        finals, offsets = [], {}
        async for index, chunk in generation.chunks():
            if chunk.text or chunk.finish_reason:
                lp = _text_logprobs(chunk.logprobs, offsets.get(index, 0)) if logprobs else None
                offsets[index] = offsets.get(index, 0) + len(chunk.text)
                yield {**self.envelope, "object": "text_completion", "choices": [{"index": index, "text": chunk.text, "logprobs": lp, "finish_reason": chunk.finish_reason}]}
            if chunk.finish_reason:
                finals.append(chunk)
        if self.include_usage:
            yield {**self.envelope, "object": "text_completion", "choices": [], "usage": _usage(usage_of(finals))}
        yield "[DONE]"


def _tool_call_out(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments_json}}


def _piece(token: bytes) -> str:
    return token.decode("utf-8", errors="replace")


def _chat_logprob_list(logprobs: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": _piece(lp.piece), "logprob": lp.logprob, "bytes": list(lp.piece),
                "top_logprobs": [{"token": _piece(p), "logprob": v, "bytes": list(p)} for _, p, v in lp.top],
            }
            for lp in logprobs
        ],
        "refusal": None,
    }


def _text_logprobs(logprobs: tuple[TokenLogprob, ...], offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel lists, with each token's offset into the text."""
    offsets = []
    for lp in logprobs:
        offsets.append(offset)
        offset += len(_piece(lp.piece))
    return {
        "tokens": [_piece(lp.piece) for lp in logprobs],
        "token_logprobs": [lp.logprob for lp in logprobs],
        "top_logprobs": [{_piece(p): v for _, p, v in lp.top} for lp in logprobs],
        "text_offset": offsets,
    }


def _usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        **dropped(usage),
    }


def _stream_error(error: ApiError) -> dict[str, Any]:
    return openai_error(error)  # type: ignore[return-value]


# --- completions ---------------------------------------------------------------------------------


async def completions(request: Request) -> Response:
    body = await read_json(request)
    engine: Engine = request.app.state.engine
    prompt = await run_in_threadpool(_completion_prompt, engine, body)
    if "suffix" in body:
        raise ApiError(400, "'suffix' (fill in the middle) is not supported", param="suffix")
    best_of = body.integer("best_of", minimum=1)
    if best_of is not None and best_of != _n(body):
        raise ApiError(400, "'best_of' is not supported (leave it out, or equal to 'n')", param="best_of")
    top = body.integer("logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS)
    sampling = request_sampling(body, request.app.state.settings.defaults, grammar=response_grammar(body), logprobs=top)
    echo = bool(body.boolean("echo"))
    reply = _Reply(request, body, "cmpl")
    generation = Generation(engine, prompt, sampling, n=_n(body))
    if body.boolean("stream"):
        if echo:
            raise ApiError(400, "'echo' is supported without streaming only", param="echo")
        return sse(reply.text_events(generation, top is not None), _stream_error)
    results = await generation.result()
    choices = []
    for i, result in enumerate(results):
        choice = reply.text_choice(i, result, top is not None)
        if echo:
            choice["text"] = engine.detokenize(prompt.tokens) + choice["text"]
        choices.append(choice)
    return JSONResponse({**reply.envelope, "object": "text_completion", "choices": choices, "usage": _usage(usage_of(results)),
                         "timings": timings_of(results[0])})


def _completion_prompt(engine: Engine, body: Body) -> Prompt:
    """A string, or one list of token ids; a batch of several prompts is refused."""
    text = body.raw("prompt")
    if isinstance(text, list) and len(text) == 1 and isinstance(text[0], (str, list)):
        text = text[0]
    if isinstance(text, str):
        return engine.text_prompt(text)
    if isinstance(text, list) and text and all(isinstance(t, int) and not isinstance(t, bool) for t in text):
        return Prompt(tokens=list(text))
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")


# --- embeddings ----------------------------------------------------------------------------------


async def embeddings(request: Request) -> Response:
    body = await read_json(request)
    engine: Engine = request.app.state.engine
    inputs = body.raw("input")
    if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and all(isinstance(t, int) for t in inputs)):
        inputs = [inputs]
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) or (isinstance(t, list) and t and all(isinstance(i, int) for i in t)) for t in inputs):
        raise ApiError(400, "'input' must be a string, a list of strings, or token ids", param="input")
    encoding = body.string("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise body.fail("encoding_format", "must be float or base64")
    texts = [t if isinstance(t, str) else engine.detokenize(t) for t in inputs]
    vectors, used = await run_in_threadpool(_embed_all, engine, texts)
    dimensions = body.integer("dimensions", minimum=1)
    if dimensions is not None and dimensions != len(vectors[0]):
        raise ApiError(400, f"this model's embeddings have {len(vectors[0])} dimensions; leave out 'dimensions'", param="dimensions")
    data = [{"object": "embedding", "index": i, "embedding": _encoded(v, encoding)} for i, v in enumerate(vectors)]
    settings: ServerSettings = request.app.state.settings
    return JSONResponse({"object": "list", "data": data, "model": settings.model_id, "usage": {"prompt_tokens": used, "total_tokens": used}})


def _embed_all(engine: Engine, texts: list[str]) -> tuple[list[list[float]], int]:
    return [engine.embed(t) for t in texts], sum(len(engine.embedding_tokenize(t)) for t in texts)


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

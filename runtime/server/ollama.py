"""The Ollama dialect: /api/generate, /api/chat, /api/embed, /api/tags, /api/show, /api/ps, /api/version.

Translates Ollama's request JSON into the engine's Prompt and Sampling, and engine output back into
Ollama's NDJSON chunks and objects, so that unmodified Ollama clients (the `ollama` packages, and the
tools built on them) work against a bundle; `--ollama-port 11434` serves it where they look.
Every model name a client sends is served by the bundle's one model, which is listed as
"<model id>:latest". Errors are Ollama's `{"error": "message"}`; one that happens after a stream
began is its last line, as Ollama writes it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import llama_cpp
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime.engine import Chunk, Completion, Engine, Prompt, Sampling, Timings, TokenLogprob, reasoning
from runtime.server import sampling as sampling_fields
from runtime.server.body import Body, read_json
from runtime.server.dialect import Dialect
from runtime.server.errors import ApiError
from runtime.server.generation import Generation, dropped, ndjson
from runtime.server.openai import tool_use
from runtime.server.settings import ServerSettings
from runtime.server.structured import ToolCall, ToolUse, json_grammar


def ollama_error(error: ApiError) -> object:
    return {"error": error.message}


OLLAMA = Dialect("ollama", ollama_error)

# The Ollama release whose API this module follows (structured outputs, tool calls in streams,
# `think`, `logprobs`); clients that check the version for those features find them.
OLLAMA_VERSION = "0.12.0"
MAX_TOP_LOGPROBS = 20
FOREVER = timedelta(days=292 * 365)  # Ollama's expiry for a model kept loaded (keep_alive < 0): Go's longest duration


def routes() -> list[Route]:
    return [
        OLLAMA.route("/api/generate", generate, ["POST"]),
        OLLAMA.route("/api/chat", chat, ["POST"]),
        OLLAMA.route("/api/embed", embed, ["POST"]),
        OLLAMA.route("/api/embeddings", legacy_embeddings, ["POST"]),
        OLLAMA.route("/api/tags", tags, ["GET"]),  # GET routes answer HEAD too
        OLLAMA.route("/api/show", show, ["POST"]),
        OLLAMA.route("/api/ps", running, ["GET"]),
        OLLAMA.route("/api/version", version, ["GET"]),
        OLLAMA.route("/api/pull", pull, ["POST"]),
        *(OLLAMA.route(f"/api/{name}", unavailable, [method]) for name, method in MANAGEMENT.items()),
    ]


# --- the model, as Ollama lists it ----------------------------------------------------------------


def model_name(settings: ServerSettings) -> str:
    """Ollama names are `model:tag`; the bundle's model is the only one, under the tag `latest`."""
    return settings.model_id if ":" in settings.model_id else f"{settings.model_id}:latest"


def _quantization(file_type: str | None) -> str:
    """llama.cpp's file type number as Ollama names it ("Q4_1", "F16"), from llama.cpp's own LLAMA_FTYPE_ names."""
    if file_type is None or not file_type.isdigit():
        return ""
    for name in dir(llama_cpp):
        if name.startswith("LLAMA_FTYPE_") and getattr(llama_cpp, name) == int(file_type) and name != "LLAMA_FTYPE_GUESSED":
            return name.removeprefix("LLAMA_FTYPE_").removeprefix("MOSTLY_").removeprefix("ALL_")
    return ""


def _details(engine: Engine, settings: ServerSettings) -> dict[str, Any]:
    family = settings.model.architecture
    return {
        "parent_model": "",
        "format": "gguf",
        "family": family,
        "families": [family] if family else None,
        "parameter_size": settings.model.parameters,
        "quantization_level": _quantization(engine.metadata.get("general.file_type")),
    }


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _now() -> str:
    return _rfc3339(datetime.now(timezone.utc))


def _digest(settings: ServerSettings) -> str:
    """A stable 64-hex id for the model (Ollama's manifest digest): the SHA-256 of the server's fingerprint."""
    return hashlib.sha256(settings.fingerprint.encode()).hexdigest()


def _model_entry(engine: Engine, settings: ServerSettings) -> dict[str, Any]:
    name = model_name(settings)
    return {
        "name": name,
        "model": name,
        "modified_at": _rfc3339(datetime.fromtimestamp(settings.started_at, timezone.utc)),
        "size": settings.model.size,
        "digest": _digest(settings),
        "details": _details(engine, settings),
    }


async def tags(request: Request) -> Response:
    return JSONResponse({"models": [_model_entry(request.app.state.engine, request.app.state.settings)]})


async def running(request: Request) -> Response:
    """The model is loaded for as long as the server runs, so it never expires."""
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    entry = _model_entry(engine, settings)
    on_gpu = bool(settings.hardware.get("gpu_layers"))
    entry.update(
        expires_at=_rfc3339(datetime.now(timezone.utc) + FOREVER),
        size_vram=settings.model.size if on_gpu else 0,
        context_length=engine.n_ctx,
    )
    return JSONResponse({"models": [entry]})


async def version(_request: Request) -> Response:
    return JSONResponse({"version": OLLAMA_VERSION})


async def show(request: Request) -> Response:
    body = await read_json(request)
    if not (body.string("model") or body.string("name")):
        raise ApiError(400, "model is required")
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    parameters = _parameters(engine, settings.defaults)
    answer: dict[str, Any] = {
        "modelfile": f"# Modelfile of the model inside this llamabox bundle\nFROM {model_name(settings)}\n"
        + "".join(f"PARAMETER {key} {value}\n" for key, value in parameters),
        "parameters": "\n".join(f"{key:<30} {value}" for key, value in parameters),
        "template": engine.chat_template or "",
        "details": _details(engine, settings),
        "model_info": _model_info(engine),
        "capabilities": ["completion", "tools"],  # tools: through the template, or described in a system message
        "modified_at": _model_entry(engine, settings)["modified_at"],
    }
    if settings.model.license:
        answer["license"] = settings.model.license
    if settings.system_prompt:
        answer["system"] = settings.system_prompt
    return JSONResponse(answer)


def _parameters(engine: Engine, defaults: Sampling) -> list[tuple[str, str]]:
    """The server's defaults as a Modelfile's PARAMETER lines, as Ollama shows a model's parameters."""
    values: list[tuple[str, Any]] = [
        ("num_ctx", engine.n_ctx),
        ("temperature", defaults.temperature),
        ("top_k", defaults.top_k),
        ("top_p", defaults.top_p),
        ("min_p", defaults.min_p),
        ("repeat_penalty", defaults.repeat_penalty),
    ]
    if defaults.max_tokens is not None:
        values.append(("num_predict", defaults.max_tokens))
    values.extend(("stop", json.dumps(stop)) for stop in defaults.stop)
    return [(key, f"{value:g}" if isinstance(value, float) else str(value)) for key, value in values]


def _model_info(engine: Engine) -> dict[str, Any]:
    """The GGUF's metadata with numbers as numbers; the chat template is in `template` instead."""
    info: dict[str, Any] = {key: _typed(value) for key, value in sorted(engine.metadata.items()) if key != "tokenizer.chat_template"}
    architecture = engine.metadata.get("general.architecture")
    if architecture and f"{architecture}.context_length" not in info:
        info[f"{architecture}.context_length"] = engine.n_ctx
    return info


def _typed(value: str) -> Any:
    if value in ("true", "false"):
        return value == "true"
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        return number if isinstance(number, int) or math.isfinite(number) else value
    return value


async def pull(request: Request) -> Response:
    """Every name is served by the bundle's model, which is already here: pulling is done at once.

    Scripts often pull a model before using it; they go on as if the download had finished.
    """
    body = await read_json(request)
    if not (body.string("model") or body.string("name")):
        raise ApiError(400, "model is required")
    if _streams(body):
        return ndjson(_one({"status": "success"}), ollama_error)
    return JSONResponse({"status": "success"})


async def _one(event: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield event


MANAGEMENT = {"create": "POST", "copy": "POST", "delete": "DELETE", "push": "POST"}


async def unavailable(request: Request) -> Response:
    action = request.url.path.rsplit("/", 1)[-1]
    raise ApiError(400, f"/api/{action} is not available: this server runs the one model inside its file, which cannot be created, copied, deleted or pushed")


# --- requests: model, options, format ---------------------------------------------------------------


def _require_model(body: Body) -> None:
    """Ollama wants a model name; whichever it is, the bundle's model answers."""
    if not body.string("model"):
        raise ApiError(400, "model is required")


def _streams(body: Body) -> bool:
    stream = body.boolean("stream")
    return True if stream is None else stream  # Ollama streams unless told not to


def _thinking(body: Body, engine: Engine) -> bool | None:
    """Ollama's `think`: true (or a level, low, medium or high) lets a reasoning model think, false stops it, absent
    leaves it to the model's template. A model that does not reason refuses true."""
    think = body.raw("think")
    if think is None or think is False:
        return think
    if not (think is True or think in ("low", "medium", "high")):
        raise body.fail("think", "must be true, false, or low, medium or high")
    if not engine.reasons:
        raise ApiError(400, "this model does not support thinking; leave out 'think' or send false", param="think")
    return True


def _think_kwargs(think: bool | None) -> dict[str, Any]:
    """The template's enable_thinking, as `think` sets it (nothing when absent)."""
    return {} if think is None else {"enable_thinking": think}


def _thoughts(engine: Engine, think: bool | None, prompt: Prompt) -> reasoning.Splitter | None:
    """A splitter for the reply's thinking (Ollama returns it apart from the content), unless `think` is false or the
    model does not reason."""
    return reasoning.Splitter(reasoning.thinking_open(prompt.text)) if engine.reasons and think is not False else None


def _whole(splitter: reasoning.Splitter | None, text: str) -> tuple[str, str]:
    """(thinking, content) of a whole reply, the thinking without the blank lines around it."""
    thinking, content = _split(splitter, text, last=True)
    return thinking.strip(), content


def _split(splitter: reasoning.Splitter | None, text: str, last: bool) -> tuple[str, str]:
    """(thinking, content) of a piece of the reply (the whole reply: `last` with one piece)."""
    return ("", text) if splitter is None else splitter.feed(text, last)


def _refuse_images(images: Any, where: Body, name: str = "images") -> None:
    if images is not None and not isinstance(images, list):
        raise where.fail(name, "must be a list of base64-encoded images")
    if images:
        raise ApiError(400, "this model reads text only; send no images", param=name)


def format_grammar(body: Body) -> str | None:
    """`format`: "json" for any JSON object, or a JSON schema; held by a llama.cpp grammar."""
    fmt = body.raw("format")
    if fmt is None or fmt == "":
        return None
    if fmt == "json":
        return json_grammar(None, param="format")
    if isinstance(fmt, dict):
        return json_grammar(fmt, param="format")
    raise ApiError(400, 'invalid format: expected "json" or a JSON schema object', param="format")


# Options Ollama applies when it loads a model (threads, GPU layers, memory mapping, context size):
# here the server settles them once at start (--threads, --gpu-layers, --ctx-size). They are
# accepted, so that clients that always send them work, and change nothing. num_ctx is among
# them: a request cannot resize the context, and refusing a num_ctx larger than --ctx-size would
# break clients that send a large one by habit; a prompt that does not fit gets a 400 that names
# --ctx-size, which is where the difference matters.
LOAD_TIME_OPTIONS = frozenset(
    {"numa", "num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "logits_all", "vocab_only",
     "use_mmap", "use_mlock", "embedding_only", "num_thread"}
)
# Accepted and without effect here: num_keep (what a context shift keeps; the context never
# shifts), penalize_newline (deprecated by Ollama, whose own sampler ignores it), and Mirostat's
# tau and eta (used only with mirostat, which is refused unless 0).
INERT_OPTIONS = frozenset({"num_keep", "penalize_newline", "mirostat_tau", "mirostat_eta"})
SAMPLING_OPTIONS = frozenset(
    {"num_predict", "temperature", "top_k", "top_p", "min_p", "typical_p", "tfs_z", "mirostat", "repeat_last_n",
     "repeat_penalty", "presence_penalty", "frequency_penalty", "seed", "stop"}
)
MAX_PENALTY = 100  # llama.cpp wants finite penalties; Ollama's documented values stay within a few units
REPEAT_LAST_N = 64  # the tokens the engine's repetition penalties look back over (engine/sampling.py)


def _options(body: Body) -> Body:
    options = body.obj("options") or Body({}, prefix="options.")
    for key in options.data:
        if key not in SAMPLING_OPTIONS | LOAD_TIME_OPTIONS | INERT_OPTIONS:
            raise ApiError(400, f"'options.{key}' is not an option this server knows; see Ollama's Modelfile parameters", param=f"options.{key}")
    for key in ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep"):
        options.integer(key)
    return options


def request_sampling(body: Body, defaults: Sampling, *, grammar: str | None, logprobs: int | None) -> Sampling:
    """The server's defaults with what `options` sets.

    num_predict: a positive number limits the tokens generated; -1 (unlimited), -2 (fill the
    context) and 0 (unlimited, as Ollama's runner reads it) all generate until the answer ends or
    the context is full, which ends it with done_reason "length".
    """
    options = _options(body)
    num_predict = options.integer("num_predict", minimum=-2)
    sampling = sampling_fields.override(
        defaults,
        max_tokens=num_predict if num_predict is not None and num_predict > 0 else None,
        temperature=options.number("temperature", minimum=0),
        top_k=options.integer("top_k", minimum=0),
        top_p=options.number("top_p", minimum=0, maximum=1),
        min_p=options.number("min_p", minimum=0, maximum=1),
        repeat_penalty=_repeat_penalty(options),
        presence_penalty=options.number("presence_penalty", minimum=-MAX_PENALTY, maximum=MAX_PENALTY),
        frequency_penalty=options.number("frequency_penalty", minimum=-MAX_PENALTY, maximum=MAX_PENALTY),
        seed=sampling_fields.seed(options),
        stop=options.strings("stop"),
        grammar=grammar,
        logprobs=logprobs,
    )
    if num_predict is not None and num_predict <= 0:
        sampling = replace(sampling, max_tokens=None)
    _refuse_unsupported_sampling(options, sampling)
    return sampling


def _repeat_penalty(options: Body) -> float | None:
    penalty = options.number("repeat_penalty", minimum=0, maximum=MAX_PENALTY)
    if penalty == 0:  # llama.cpp divides by it
        raise options.fail("repeat_penalty", "must be more than 0 (1 turns it off)")
    return penalty


def _refuse_unsupported_sampling(options: Body, sampling: Sampling) -> None:
    """Samplers the engine does not have are refused unless they are set to their neutral value."""
    typical_p = options.number("typical_p", minimum=0)
    if typical_p is not None and typical_p < 1:
        raise ApiError(400, "'options.typical_p' (locally typical sampling) is not supported; leave it out or send 1", param="options.typical_p")
    tfs_z = options.number("tfs_z", minimum=0)
    if tfs_z is not None and tfs_z != 1:
        raise ApiError(400, "'options.tfs_z' (tail-free sampling, gone from llama.cpp) is not supported; leave it out or send 1", param="options.tfs_z")
    if options.integer("mirostat", minimum=0, maximum=2):
        raise ApiError(400, "'options.mirostat' is not supported; leave it out or send 0, and use temperature, top_k, top_p or min_p", param="options.mirostat")
    last_n = options.integer("repeat_last_n", minimum=-1)
    penalized = sampling.repeat_penalty != 1 or sampling.presence_penalty or sampling.frequency_penalty
    if last_n is not None and last_n != REPEAT_LAST_N and penalized:
        message = f"the repetition penalties look back over the last {REPEAT_LAST_N} tokens here; leave it out or send {REPEAT_LAST_N}"
        raise ApiError(400, f"'options.repeat_last_n': {message}", param="options.repeat_last_n")


def _logprobs(body: Body) -> int | None:
    """How many alternatives to report per token, or None for no log-probabilities."""
    top = body.raw("top_logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise ApiError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
    if body.boolean("logprobs") or top:
        return top or 0
    return None


# --- answers: chunks, the final object, metrics -----------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """What every chunk of one answer shares: the model's name, when the request began, what to report."""

    model: str
    started_ns: int
    logprobs: bool

    def head(self) -> dict[str, Any]:
        return {"model": self.model, "created_at": _now()}

    def piece(self, chunk: Chunk) -> dict[str, Any]:
        return {"logprobs": _logprob_list(chunk.logprobs)} if self.logprobs and chunk.logprobs else {}

    def metrics(self, last: Chunk | Completion) -> dict[str, Any]:
        """Ollama's statistics, in nanoseconds; the model is loaded before the server answers, so loading took 0."""
        timings = last.timings or Timings()
        return {
            "done_reason": "length" if last.finish_reason == "length" else "stop",
            "total_duration": time.perf_counter_ns() - self.started_ns,
            "load_duration": 0,
            "prompt_eval_count": last.prompt_tokens,
            "prompt_eval_duration": round(timings.prompt_ms * 1e6),
            "eval_count": last.completion_tokens,
            "eval_duration": round(timings.predicted_ms * 1e6),
            **dropped(last),
        }


def _logprob_list(logprobs: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    def entry(piece: bytes, logprob: float) -> dict[str, Any]:
        return {"token": piece.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(piece)}

    return [{**entry(lp.piece, lp.logprob), "top_logprobs": [entry(p, v) for _, p, v in lp.top]} for lp in logprobs]


def _loaded(answer: _Answer, body: Body, extra: dict[str, Any]) -> Response:
    """A request with nothing to generate only loads (or unloads) the model in Ollama; here it is always loaded."""
    reason = "unload" if _is_zero(body.raw("keep_alive")) else "load"
    return JSONResponse({**answer.head(), **extra, "done": True, "done_reason": reason})


def _keep_alive(body: Body) -> None:
    """keep_alive is accepted and has no effect: the model stays loaded while the server runs."""
    value = body.raw("keep_alive")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        raise body.fail("keep_alive", 'must be a duration such as "5m" or a number of seconds')


def _is_zero(keep_alive: Any) -> bool:
    if isinstance(keep_alive, (int, float)) and not isinstance(keep_alive, bool):
        return keep_alive == 0
    return isinstance(keep_alive, str) and keep_alive.strip().rstrip("hms").strip() in ("0", "0.0")


# --- /api/generate -----------------------------------------------------------------------------------


async def _generation_body(request: Request) -> Body:
    """The body of /api/generate or /api/chat, with what both check first: a model named, keep_alive."""
    body = await read_json(request)
    _require_model(body)
    _keep_alive(body)
    return body


async def generate(request: Request) -> Response:
    started = time.perf_counter_ns()
    body = await _generation_body(request)
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    _refuse_images(body.raw("images"), body)
    if body.string("suffix"):
        raise ApiError(400, "this model does not support insert: 'suffix' (fill in the middle) needs a model made for it", param="suffix")
    if body.string("template"):
        message = "the model's own chat template is used; leave it out, or send the prompt already formatted with raw: true"
        raise ApiError(400, f"'template' is not supported: {message}", param="template")
    text, system, raw = body.string("prompt") or "", body.string("system") or "", bool(body.boolean("raw"))
    context = _context(body)
    if raw and (system or context):
        raise ApiError(400, "raw mode does not support template, system, or context")
    answer = _Answer(model_name(settings), started, logprobs=False)
    if not text and not system:
        return _loaded(answer, body, {"response": ""})
    grammar = format_grammar(body)
    top = _logprobs(body)
    think = _thinking(body, engine)
    answer = replace(answer, logprobs=top is not None)
    prompt = await run_in_threadpool(_generate_prompt, engine, text, system, raw, context, _think_kwargs(think))
    sampling = request_sampling(body, settings.defaults, grammar=grammar, logprobs=top)
    generation = Generation(engine, prompt, sampling)
    with_context = not raw  # Ollama returns the conversation's tokens, except in raw mode
    splitter = None if raw else _thoughts(engine, think, prompt)
    if _streams(body):
        return ndjson(_generate_events(engine, answer, generation, prompt, with_context, splitter), ollama_error)
    [result] = await generation.result()
    thinking, response = _whole(splitter, result.text)
    final = {**answer.head(), "response": response, **({"thinking": thinking} if thinking else {}), "done": True, **answer.metrics(result)}
    if answer.logprobs:
        final["logprobs"] = _logprob_list(result.logprobs)
    if with_context:
        final["context"] = await run_in_threadpool(_conversation, engine, prompt, result.text)
    return JSONResponse(final)


def _context(body: Body) -> list[int]:
    """The deprecated `context`: token ids a previous /api/generate returned, continued from."""
    context = body.array("context") or []
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in context):
        raise body.fail("context", "must be the list of token ids a previous response returned")
    return context


def _generate_prompt(engine: Engine, text: str, system: str, raw: bool, context: list[int], kwargs: dict[str, Any]) -> Prompt:
    """The prompt in the model's chat template (with `system` and the template variables `kwargs`), or as is with raw;
    after `context`."""
    if raw:
        return engine.text_prompt(text)
    if engine.has_chat_template:
        messages = [{"role": "system", "content": system}] if system else []
        prompt = engine.chat_prompt([*messages, {"role": "user", "content": text}], template_kwargs=kwargs)
    else:  # as Ollama's default template for a model without one: the prompt as is
        prompt = engine.text_prompt(f"{system}\n\n{text}" if system else text)
    if context:
        engine.detokenize(context)  # refuses ids outside the vocabulary
        prompt = Prompt(tokens=[*context, *prompt.tokens], stop=prompt.stop)
    return prompt


def _conversation(engine: Engine, prompt: Prompt, response: str) -> list[int]:
    """The `context` to send back: the prompt's tokens and the answer's (re-tokenized, as Ollama does)."""
    return [*prompt.tokens, *engine.tokenize(response, add_bos=False)] if response else list(prompt.tokens)


async def _generate_events(
    engine: Engine, answer: _Answer, generation: Generation, prompt: Prompt, with_context: bool, splitter: reasoning.Splitter | None
) -> AsyncIterator[dict[str, Any]]:
    pieces: list[str] = []
    async for _, chunk in generation.chunks():
        thinking, response = _split(splitter, chunk.text, last=chunk.finish_reason is not None)
        if thinking or response:
            pieces.append(chunk.text)
            yield {**answer.head(), "response": response, **({"thinking": thinking} if thinking else {}), "done": False, **answer.piece(chunk)}
        elif chunk.logprobs and answer.logprobs:
            yield {**answer.head(), "response": "", "done": False, **answer.piece(chunk)}
        if chunk.finish_reason:
            final = {**answer.head(), "response": "", "done": True, **answer.metrics(chunk)}
            if with_context:
                final["context"] = await run_in_threadpool(_conversation, engine, prompt, "".join(pieces))
            yield final


# --- /api/chat ---------------------------------------------------------------------------------------


async def chat(request: Request) -> Response:
    started = time.perf_counter_ns()
    body = await _generation_body(request)
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    messages = chat_messages(body)
    answer = _Answer(model_name(settings), started, logprobs=False)
    if not messages:
        return _loaded(answer, body, {"message": {"role": "assistant", "content": ""}})
    tools = tool_use(body)  # Ollama's tools are OpenAI's function tools; the model chooses whether to call one
    grammar = format_grammar(body)
    top = _logprobs(body)
    answer = replace(answer, logprobs=top is not None)
    think = _thinking(body, engine)
    prompt = await run_in_threadpool(tools.prompt, engine, messages, _think_kwargs(think))
    sampling = request_sampling(body, settings.defaults, grammar=grammar, logprobs=top)
    generation = Generation(engine, prompt, sampling)
    splitter = _thoughts(engine, think, prompt)
    if _streams(body):
        return ndjson(_chat_events(answer, generation, tools, splitter), ollama_error)
    [result] = await generation.result()
    final = {**answer.head(), "message": _assistant(*_whole(splitter, result.text), tools), "done": True, **answer.metrics(result)}
    if answer.logprobs:
        final["logprobs"] = _logprob_list(result.logprobs)
    return JSONResponse(final)


def chat_messages(body: Body) -> list[dict[str, Any]]:
    """Ollama's messages as the OpenAI-style messages chat templates and structured.ToolUse read."""
    messages = body.array("messages") or []
    if not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a list of {role, content} objects", param="messages")
    return [_message(Body(m, prefix=f"messages[{i}]."), i) for i, m in enumerate(messages)]


def _message(message: Body, index: int) -> dict[str, Any]:
    role = (message.string("role", required=True) or "").lower()
    if role not in ("system", "user", "assistant", "tool"):
        raise message.fail("role", "must be system, user, assistant or tool")
    _refuse_images(message.raw("images"), message)
    out: dict[str, Any] = {"role": role, "content": message.string("content") or ""}
    calls = message.array("tool_calls")
    if role == "assistant" and calls:
        out["tool_calls"] = [_call_in(message, f"messages[{index}].tool_calls[{i}].", call) for i, call in enumerate(calls)]
    if role == "tool":
        out["tool_call_id"] = message.string("tool_call_id") or ""
        name = message.string("tool_name") or message.string("name")
        if name:
            out["name"] = name
    return out  # `thinking` of earlier turns is dropped, as reasoning models' templates drop it


def _call_in(message: Body, prefix: str, call: Any) -> dict[str, Any]:
    """An earlier turn's tool call ({function: {name, arguments: {...}}}) in OpenAI's shape."""
    if not isinstance(call, dict):
        raise message.fail("tool_calls", "must be a list of {function: {name, arguments}} objects")
    function = Body(call, prefix=prefix).obj("function", required=True)
    assert function is not None
    arguments = function.raw("arguments")
    if arguments is not None and not isinstance(arguments, (dict, str)):
        raise function.fail("arguments", "must be an object")
    name = function.string("name", required=True)
    return {"id": call.get("id") or "", "type": "function", "function": {"name": name, "arguments": arguments or {}}}


def _call_out(index: int, call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "function": {"index": index, "name": call.name, "arguments": call.arguments}}


def _assistant(thinking: str, text: str, tools: ToolUse) -> dict[str, Any]:
    """The answer as an assistant message: its text, or the tool calls it makes (arguments as objects), after its
    thinking (Ollama's `thinking`) where the model thought."""
    thought = {"thinking": thinking} if thinking else {}
    calls = tools.parse(text)
    if calls:
        return {"role": "assistant", "content": "", **thought, "tool_calls": [_call_out(i, c) for i, c in enumerate(calls)]}
    return {"role": "assistant", "content": text, **thought}


async def _chat_events(answer: _Answer, generation: Generation, tools: ToolUse, splitter: reasoning.Splitter | None) -> AsyncIterator[dict[str, Any]]:
    """Text as it comes; with tools, the answer is held until whole, since only then is it known to be a call."""
    held: list[Chunk] = []
    async for _, chunk in generation.chunks():
        if tools.active:
            held.append(chunk)
            if chunk.finish_reason:
                whole = Completion.from_pieces(held)
                extra = {"logprobs": _logprob_list(whole.logprobs)} if answer.logprobs else {}
                yield {**answer.head(), "message": _assistant(*_whole(splitter, whole.text), tools), "done": False, **extra}
        else:
            thinking, content = _split(splitter, chunk.text, last=chunk.finish_reason is not None)
            if thinking or content or (chunk.logprobs and answer.logprobs):
                message = {"role": "assistant", "content": content, **({"thinking": thinking} if thinking else {})}
                yield {**answer.head(), "message": message, "done": False, **answer.piece(chunk)}
        if chunk.finish_reason:
            yield {**answer.head(), "message": {"role": "assistant", "content": ""}, "done": True, **answer.metrics(chunk)}


# --- embeddings --------------------------------------------------------------------------------------


async def embed(request: Request) -> Response:
    """One unit-length vector per input; `truncate` (default true) cuts an input to the context."""
    started = time.perf_counter_ns()
    body = await read_json(request)
    _require_model(body)
    _keep_alive(body)
    _options(body)
    engine: Engine = request.app.state.engine
    inputs = body.raw("input")
    if inputs is None or inputs == "":
        texts: list[str] = []
    elif isinstance(inputs, str):
        texts = [inputs]
    elif isinstance(inputs, list) and all(isinstance(t, str) for t in inputs):
        texts = inputs
    else:
        raise ApiError(400, "invalid input type: 'input' must be a string or a list of strings", param="input")
    truncate = body.boolean("truncate")
    dimensions = body.integer("dimensions", minimum=1)
    vectors, used = await run_in_threadpool(_embed_all, engine, texts, truncate is not False)
    if dimensions is not None and vectors:
        vectors = [_shortened(v, dimensions) for v in vectors]
    settings: ServerSettings = request.app.state.settings
    elapsed = time.perf_counter_ns() - started
    return JSONResponse(
        {"model": model_name(settings), "embeddings": vectors, "total_duration": elapsed, "load_duration": 0, "prompt_eval_count": used}
    )


def _embed_all(engine: Engine, texts: list[str], truncate: bool) -> tuple[list[list[float]], int]:
    vectors, used = [], 0
    for text in texts:
        text, tokens = _fitted(engine, text, truncate)
        vectors.append(engine.embed(text))
        used += tokens
    return vectors, used


def _fitted(engine: Engine, text: str, truncate: bool) -> tuple[str, int]:
    """The text, cut at its end to the tokens an embedding takes if `truncate`; with its token count."""
    limit = engine.embedding_limit
    count = len(engine.embedding_tokenize(text))
    if count <= limit or not truncate:
        return text, count  # too long without truncate: the engine refuses it with a 400 that says so
    body = engine.embedding_tokenize(text, add_bos=False)
    keep = len(body) - (count - limit)
    while keep > 0:
        text = engine.embedding_detokenize(body[:keep])
        count = len(engine.embedding_tokenize(text))
        if count <= limit:
            return text, count
        keep -= count - limit  # re-tokenizing can merge differently: cut again by the excess
    raise ApiError(400, "the input cannot be cut to fit the context", param="input")


def _shortened(vector: list[float], dimensions: int) -> list[float]:
    """The first `dimensions` values, unit length again (as Ollama shortens embeddings)."""
    if dimensions > len(vector):
        raise ApiError(400, f"this model's embeddings have {len(vector)} dimensions; ask for at most that many", param="dimensions")
    head = vector[:dimensions]
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]


async def legacy_embeddings(request: Request) -> Response:
    """The older /api/embeddings: one `prompt`, one `embedding` (unit length here; Ollama's is not normalized)."""
    body = await read_json(request)
    _require_model(body)
    _keep_alive(body)
    _options(body)
    text = body.string("prompt") or ""
    if not text:
        return JSONResponse({"embedding": []})
    engine: Engine = request.app.state.engine
    vectors, _ = await run_in_threadpool(_embed_all, engine, [text], False)
    return JSONResponse({"embedding": vectors[0]})

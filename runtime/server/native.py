"""llama.cpp's own server API, as llama-server and llamafile expose it: /completion, /tokenize,
/detokenize, /embedding, /apply-template, /health, /props and /slots, with llama-server's JSON and error shapes.

Code written for llamafile's or llama-server's native routes works unchanged against a bundle.
Requests are read into the engine's Prompt and Sampling; generation and streaming are
generation.py's, grammars structured.py's. llama-server samplers that llamabox does not have
(mirostat, DRY, XTC, typical-p, ...) are accepted at the values that turn them off, and refused
with a 400 otherwise, so that no setting is silently dropped.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from runtime import __version__
from runtime.engine import Chunk, Engine, Prompt, Sampling, Timings, TokenLogprob, valid_filename
from runtime.engine.infill import InfillRequest, infill_tokens
from runtime.engine.sampling import PENALTY_LAST_N
from runtime.server import prometheus
from runtime.server import sampling as sampling_fields
from runtime.server.body import Body, read_json, read_json_value
from runtime.server.dialect import Dialect
from runtime.server.errors import ApiError
from runtime.server.generation import Generation, sse, timings_of
from runtime.server.openai import chat_messages, template_kwargs, tool_use
from runtime.server.settings import ServerSettings
from runtime.server.structured import json_grammar

MAX_STOP = 64
MAX_N_PROBS = 4096  # text-generation-webui asks for 4096 alternatives to read the next token's distribution
UNSET_SEED = 0xFFFFFFFF  # how llama-server shows seed -1 (random)
INT16_RANGE = 32760.0  # embd_normalize 0 scales the largest component to this, as llama-server does
# Bounds on penalties and biases, far beyond any useful value, so that llama.cpp's 32-bit logits stay finite.
LARGEST = 1e6


# --- errors --------------------------------------------------------------------------------------


class ContextExceeded(ApiError):
    """A prompt longer than a slot's context: llama-server names both sizes in the error object."""

    def __init__(self, n_prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(
            400,
            f"request ({n_prompt_tokens} tokens) exceeds the available context size ({n_ctx} tokens); "
            "shorten the prompt or restart with a larger --ctx-size",
            param="prompt",
        )
        self.n_prompt_tokens, self.n_ctx = n_prompt_tokens, n_ctx


def llama_cpp_error(error: ApiError) -> dict[str, Any]:
    """llama-server's error JSON: OpenAI's fields, with the HTTP status as the code."""
    body: dict[str, Any] = {"code": error.status, "message": error.message, "type": "not_supported_error" if error.status == 501 else error.kind}
    if isinstance(error, ContextExceeded):
        body.update(type="exceed_context_size_error", n_prompt_tokens=error.n_prompt_tokens, n_ctx=error.n_ctx)
    return {"error": body}


NATIVE = Dialect("llama.cpp", llama_cpp_error)


def routes() -> list[Route]:
    return [
        NATIVE.route("/health", health, ["GET"]),
        NATIVE.route("/v1/health", health, ["GET"]),
        NATIVE.route("/props", props, ["GET"]),
        NATIVE.route("/props", change_props, ["POST"]),
        NATIVE.route("/slots", list_slots, ["GET"]),
        NATIVE.route("/completion", completion, ["POST"]),
        NATIVE.route("/completions", completion, ["POST"]),
        NATIVE.route("/infill", infill, ["POST"]),
        NATIVE.route("/tokenize", tokenize, ["POST"]),
        NATIVE.route("/detokenize", detokenize, ["POST"]),
        NATIVE.route("/embedding", embedding, ["POST"]),
        NATIVE.route("/embeddings", embedding, ["POST"]),
        NATIVE.route("/apply-template", apply_template, ["POST"]),
        *(NATIVE.route(path, rerank, ["POST"]) for path in ("/rerank", "/reranking", "/v1/rerank", "/v1/reranking")),
        NATIVE.route("/metrics", prometheus.metrics, ["GET"]),
        NATIVE.route("/lora-adapters", list_lora_adapters, ["GET"]),
        NATIVE.route("/lora-adapters", set_lora_adapters, ["POST"]),
        NATIVE.route("/slots/{id_slot}", slot_action, ["POST"]),
    ]


# llama-server routes for features llamabox does not have: 501, as llama-server answers for a disabled feature.

# --- health, props, slots ------------------------------------------------------------------------


async def health(request: Request) -> Response:
    """llama-server's {"status": "ok"}, with llamafile's slot counts."""
    engine: Engine = request.app.state.engine
    slots, waiting = engine.slots()
    busy = sum(slot.is_processing for slot in slots)
    return JSONResponse({"status": "ok", "slots_idle": len(slots) - busy, "slots_processing": busy, "requests_waiting": waiting})


async def list_slots(request: Request) -> Response:
    """One object per slot; `?fail_on_no_slot=1` answers 503 when none is idle, as llama-server."""
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    if not settings.endpoints.slots:
        raise ApiError(501, "This server does not support slots endpoint. Start it with `--slots`")
    slots, _ = engine.slots()
    if request.query_params.get("fail_on_no_slot") not in (None, "", "0", "false") and all(s.is_processing for s in slots):
        raise ApiError(503, "no slot available")
    params = _generation_settings(_defaults(settings), stream=False)
    return JSONResponse(
        [
            {
                "id": s.id, "id_task": -1, "n_ctx": s.n_ctx, "speculative": s.speculative, "is_processing": s.is_processing,
                "params": params, "cached_tokens": s.cached_tokens,
                # llamabox's: how the draft fared for the slot's request (its last, when idle)
                **({"draft_n": s.draft_n, "draft_n_accepted": s.draft_n_accepted} if s.speculative else {}),
                "next_token": {"has_next_token": s.is_processing, "has_new_line": False, "n_remain": -1, "n_decoded": 0, "stopping_word": ""},
            }
            for s in slots
        ]
    )


async def props(request: Request) -> Response:
    """llama-server's /props, plus what hardware the runtime detected and uses.

    `default_generation_settings` holds the settings both flat (llamafile's and older llama-server's
    shape) and under `params` (today's), next to `n_ctx`.
    """
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    params = _generation_settings(_defaults(settings), stream=False)
    return JSONResponse(
        {
            "default_generation_settings": {"n_ctx": engine.n_ctx, **params, "params": params},
            "total_slots": engine.parallel,
            "model_alias": settings.model_id,
            "model_path": settings.model.file_name,
            "modalities": {"vision": False, "audio": False},
            "endpoint_slots": settings.endpoints.slots,
            "endpoint_props": settings.endpoints.props,
            "endpoint_metrics": settings.metrics,
            "webui": settings.endpoints.webui,
            "chat_template": engine.chat_template or "",
            "build_info": f"llamabox {__version__}",
            "n_ctx": engine.cache.cells,  # the cache's size; with a shared cache one request may use all of it
            "n_ctx_slot": engine.n_ctx,
            "hardware": settings.hardware,
        }
    )


async def apply_template(request: Request) -> Response:
    """The prompt a chat request would give the model, as its chat template writes it (tools included), without
    generating: llama-server's {"prompt": ...}. The body is /v1/chat/completions'; its errors are too."""
    body = await read_json(request)
    engine: Engine = request.app.state.engine
    prompt = await run_in_threadpool(tool_use(body).prompt, engine, chat_messages(body), template_kwargs(body))
    return JSONResponse({"prompt": prompt.text})


async def list_lora_adapters(request: Request) -> Response:
    """llama-server's list of the adapters loaded with --lora, with the scale new requests get."""
    engine: Engine = request.app.state.engine
    return JSONResponse(engine.adapters.describe())


async def set_lora_adapters(request: Request) -> Response:
    """llama-server's POST /lora-adapters: [{"id": 0, "scale": 0.5}, ...] sets the scales new requests get (adapters
    left out: 0); requests running now keep theirs."""
    engine: Engine = request.app.state.engine
    body = await read_json_value(request)
    if not isinstance(body, list):
        raise ApiError(400, "the body must be a list such as [{\"id\": 0, \"scale\": 0.5}]")
    engine.adapters.set_scales(sampling_fields.lora_scales(body, "body"))
    return JSONResponse({"success": True})


async def slot_action(request: Request) -> Response:
    """llama-server's POST /slots/{id}?action=save|restore|erase, with its answers; only with --slot-save-path, as
    there. The work waits for the slot to be idle."""
    settings: ServerSettings = request.app.state.settings
    engine: Engine = request.app.state.engine
    folder = settings.endpoints.slot_save_path
    if folder is None:
        raise ApiError(501, "This server does not support slots action. Start it with `--slot-save-path`")
    try:
        slot_id = int(request.path_params["id_slot"])
    except ValueError:
        raise ApiError(400, "Invalid slot ID") from None
    action = request.query_params.get("action")
    if action == "erase":
        erased = await run_in_threadpool(engine.erase_slot, slot_id)
        return JSONResponse({"id_slot": slot_id, "n_erased": erased})
    if action not in ("save", "restore"):
        raise ApiError(400, "Invalid action")
    body = await read_json(request)
    filename = body.string("filename", required=True) or ""
    if not valid_filename(filename):
        raise body.fail("filename", "is not a valid file name (a name, not a path)")
    if action == "save":
        saved = await run_in_threadpool(engine.save_slot, slot_id, folder / filename)
        return JSONResponse({"id_slot": slot_id, "filename": filename, "n_saved": saved.tokens, "n_written": saved.bytes,
                             "timings": {"save_ms": saved.ms}})
    restored = await run_in_threadpool(engine.restore_slot, slot_id, folder / filename)
    return JSONResponse({"id_slot": slot_id, "filename": filename, "n_restored": restored.tokens, "n_read": restored.bytes,
                         "timings": {"restore_ms": restored.ms}})


async def change_props(request: Request) -> Response:
    """llama-server's POST /props: refused unless started with --props, and then, as there, nothing to change yet."""
    settings: ServerSettings = request.app.state.settings
    if not settings.endpoints.props:
        raise ApiError(501, "This server does not support changing global properties. Start it with `--props`")
    return JSONResponse({"success": True})


# --- /completion: reading the request ------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """One /completion request's settings, as read from its body."""

    sampling: Sampling
    n_predict: int  # as llama-server reports it: -1 unlimited, 0 evaluate the prompt only, else the limit
    n_probs: int
    stream: bool
    return_tokens: bool
    timings_per_token: bool
    response_fields: list[str] | None
    model: str
    settings: dict[str, Any]  # generation_settings, as echoed in every final answer

    @property
    def evaluate_only(self) -> bool:
        return self.n_predict == 0


def _defaults(settings: ServerSettings) -> Options:
    return _options(Body({}), None, settings)


def _options(body: Body, engine: Engine | None, server: ServerSettings) -> Options:
    defaults = server.defaults
    n_predict = _n_predict(body, defaults.max_tokens)
    n_probs = body.integer("n_probs", minimum=0, maximum=MAX_N_PROBS)
    if n_probs is None and isinstance(body.raw("logprobs"), int) and not isinstance(body.raw("logprobs"), bool):
        n_probs = body.integer("logprobs", minimum=0, maximum=MAX_N_PROBS)  # OpenAI's name, read when n_probs is absent
    n_probs = n_probs or 0
    _refuse_unsupported(body)
    bias = _logit_bias(body, engine) if engine is not None else {}
    repeat_penalty = body.number("repeat_penalty", minimum=1 / LARGEST, maximum=LARGEST)
    sampling = sampling_fields.override(
        defaults,
        # n_predict 0 evaluates the prompt and samples the next token only for its probabilities.
        max_tokens=1 if n_predict == 0 else (n_predict if n_predict > 0 else None),
        temperature=body.number("temperature"),
        top_k=body.integer("top_k"),
        top_p=body.number("top_p", minimum=0, maximum=1),
        min_p=body.number("min_p", minimum=0, maximum=1),
        repeat_penalty=repeat_penalty,
        presence_penalty=body.number("presence_penalty", minimum=-LARGEST, maximum=LARGEST),
        frequency_penalty=body.number("frequency_penalty", minimum=-LARGEST, maximum=LARGEST),
        seed=sampling_fields.seed(body),
        stop=body.strings("stop", limit=MAX_STOP),
        logit_bias=bias,
        grammar=_grammar(body),
        logprobs=n_probs,  # always asked for: the chosen tokens' ids are the response's `tokens`
        n_keep=body.integer("n_keep", minimum=-1),
        lora=sampling_fields.lora(body),
    )
    sampling = _samplers(body, _penalty_window(body, sampling))
    stream = bool(body.boolean("stream"))
    fields = body.array("response_fields")
    if fields is not None and not all(isinstance(f, str) for f in fields):
        raise body.fail("response_fields", "must be a list of field names")
    model = body.raw("model")
    options = Options(
        sampling=sampling, n_predict=n_predict, n_probs=n_probs, stream=stream,
        return_tokens=bool(body.boolean("return_tokens")), timings_per_token=bool(body.boolean("timings_per_token")),
        response_fields=fields, model=model if isinstance(model, str) and model else server.model_id, settings={},
    )
    return replace(options, settings=_generation_settings(options, stream=stream))


def _n_predict(body: Body, server_limit: int | None) -> int:
    """n_predict (or its alias max_tokens), capped by the server's -n as llama-server caps it.

    -1 (the default) generates until the end of the text, a stop string or a full context.
    0 is llama-server's documented "evaluate the prompt into the cache, generate nothing": the answer
    has no content and no predicted tokens; with n_probs, completion_probabilities[0] is the next
    token's distribution (what clients that send n_predict 0 with n_probs read). Below -1 has no
    documented meaning: 400.
    """
    name = "n_predict" if "n_predict" in body else "max_tokens"
    value = body.integer(name)
    if value is None:
        value = -1
    if value < -1:
        raise body.fail(name, "must be -1 (no limit), 0 (evaluate the prompt only) or a positive number of tokens")
    if server_limit is not None and (value == -1 or value > server_limit):
        return server_limit
    return value


# llama-server options llamabox does not implement, accepted at the values that leave them off.
OFF: dict[str, tuple[Callable[[Any], bool], str]] = {
    "typical_p": (lambda v: _number(v) >= 1, "1.0"),
    "typ_p": (lambda v: _number(v) >= 1, "1.0"),
    "tfs_z": (lambda v: _number(v) >= 1, "1.0"),
    "dynatemp_range": (lambda v: _number(v) <= 0, "0"),
    "top_n_sigma": (lambda v: _number(v) <= 0, "-1"),
    "xtc_probability": (lambda v: _number(v) <= 0, "0"),
    "dry_multiplier": (lambda v: _number(v) <= 0, "0"),
    "mirostat": (lambda v: _number(v) == 0, "0"),
    "n_indent": (lambda v: _number(v) <= 0, "0"),
    "t_max_predict_ms": (lambda v: _number(v) <= 0, "0"),
    "ignore_eos": (lambda v: v is False, "false"),
    "post_sampling_probs": (lambda v: v is False, "false (probabilities are the model's, before sampling)"),
    "return_progress": (lambda v: v is False, "false"),
    "grammar_lazy": (lambda v: v is False, "false"),
    "image_data": (lambda v: v == [], "[] (this model reads text only)"),
    "multimodal_data": (lambda v: v == [], "[] (this model reads text only)"),
}


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan  # fails every comparison: refused
    return float(value)


def _refuse_unsupported(body: Body) -> None:
    for name, (is_off, off) in OFF.items():
        if name in body and not is_off(body.raw(name)):
            raise body.fail(name, f"is not supported by llamabox; leave it out or send {off}")
    body.boolean("cache_prompt")  # accepted: the longest cached prefix of a slot is always reused


def _grammar(body: Body) -> str | None:
    """GBNF from `grammar`, or from `json_schema`, which llama-server ignores when `grammar` is also sent."""
    grammar = body.string("grammar")
    if grammar:
        return grammar
    schema = body.obj("json_schema")
    return json_grammar(schema.data, param="json_schema") if schema is not None else None


def _logit_bias(body: Body, engine: Engine) -> dict[int, float]:
    """llama.cpp's forms: [[token, bias], ...] or {"token": bias}; a token is an id or a text (all its
    tokens), a bias a number or false (never this token). Ids outside the vocabulary are a 400."""
    value = body.raw("logit_bias")
    if value is None:
        return {}
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 for p in value):
        pairs = [(p[0], p[1]) for p in value]
    else:
        raise body.fail("logit_bias", "must be [[token, bias], ...] or {\"token\": bias}")
    bias: dict[int, float] = {}
    for token, amount in pairs:
        if amount is False:
            amount = -math.inf
        elif isinstance(amount, bool) or not isinstance(amount, (int, float)) or not abs(amount) <= LARGEST:
            raise body.fail("logit_bias", f"biases must be numbers between -{LARGEST:g} and {LARGEST:g}, or false to ban the token")
        if isinstance(token, int) and not isinstance(token, bool):
            ids = [token]
        elif isinstance(token, str) and token.lstrip("-").isdigit():
            ids = [int(token)]
        elif isinstance(token, str) and token:
            ids = engine.tokenize(token, add_bos=False)
        else:
            raise body.fail("logit_bias", "tokens must be token ids or non-empty texts")
        bias.update((t, float(amount)) for t in ids)
    return bias


def _penalty_window(body: Body, sampling: Sampling) -> Sampling:
    """repeat_last_n: llamabox's penalties look back over a fixed 64 tokens; 0 turns them off."""
    window = body.integer("repeat_last_n")
    if window is None or window == PENALTY_LAST_N:
        return sampling
    if window == 0:
        return replace(sampling, repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
    raise body.fail("repeat_last_n", f"must be {PENALTY_LAST_N} (llamabox's penalties look back over {PENALTY_LAST_N} tokens) or 0 (off)")


# The samplers llamabox has, in the order it applies them, with llama.cpp's names and letters for them.
OUR_SAMPLERS = ("top_k", "top_p", "min_p", "temperature")
SAMPLER_NAMES = {
    "top_k": "top_k", "top-k": "top_k", "k": "top_k",
    "top_p": "top_p", "top-p": "top_p", "nucleus": "top_p", "p": "top_p",
    "min_p": "min_p", "min-p": "min_p", "m": "min_p",
    "temperature": "temperature", "temp": "temperature", "t": "temperature",
}


def _samplers(body: Body, sampling: Sampling) -> Sampling:
    """`samplers`: which samplers run, in what order. llamabox runs top_k, top_p, min_p, temperature in
    that order; a list that leaves one out turns it off; another order is refused. The names of
    samplers llamabox lacks are skipped: their own settings are checked to be off (OFF)."""
    value = body.raw("samplers")
    if value is None:
        return sampling
    if isinstance(value, str):
        names = list(value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        names = value
    else:
        raise body.fail("samplers", "must be a list of sampler names or a string of their letters")
    ours = [SAMPLER_NAMES[n] for n in names if n in SAMPLER_NAMES]
    if ours != sorted(ours, key=OUR_SAMPLERS.index) or len(set(ours)) != len(ours):
        raise body.fail("samplers", f"must keep the order {', '.join(OUR_SAMPLERS)} (the order llamabox applies them in)")
    off = {"top_k": {"top_k": 0}, "top_p": {"top_p": 1.0}, "min_p": {"min_p": 0.0}, "temperature": {"temperature": 1.0}}
    changes = {k: v for name in OUR_SAMPLERS if name not in ours for k, v in off[name].items()}
    if "temperature" in changes and sampling.temperature <= 0:
        del changes["temperature"]  # greedy stays greedy
    return replace(sampling, **changes)


def _generation_settings(options: Options, *, stream: bool) -> dict[str, Any]:
    """llama-server's generation_settings: the settings the request ran with (samplers llamabox lacks show as off)."""
    s = options.sampling
    return {
        "n_predict": options.n_predict, "seed": UNSET_SEED if s.seed is None else s.seed,
        "temperature": s.temperature, "dynatemp_range": 0.0, "dynatemp_exponent": 1.0,
        "top_k": s.top_k, "top_p": s.top_p, "min_p": s.min_p, "top_n_sigma": -1.0,
        "xtc_probability": 0.0, "xtc_threshold": 0.1, "typical_p": 1.0,
        "repeat_last_n": PENALTY_LAST_N, "repeat_penalty": s.repeat_penalty,
        "presence_penalty": s.presence_penalty, "frequency_penalty": s.frequency_penalty,
        "dry_multiplier": 0.0, "dry_base": 1.75, "dry_allowed_length": 2, "dry_penalty_last_n": -1,
        "mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1,
        "stop": list(s.stop), "max_tokens": options.n_predict, "n_keep": s.n_keep if s.n_keep is not None else 0, "n_discard": 0,
        "ignore_eos": False,
        "stream": stream,
        "logit_bias": [{"bias": b if math.isfinite(b) else False, "token": t} for t, b in s.logit_bias.items()],
        "n_probs": options.n_probs, "min_keep": 0, "grammar": s.grammar or "",
        "samplers": ["penalties", *OUR_SAMPLERS], "timings_per_token": options.timings_per_token,
        "post_sampling_probs": False, "lora": [],
    }


# --- /completion: prompts ------------------------------------------------------------------------


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_prompts(engine: Engine, value: Any, name: str = "prompt") -> tuple[list[Prompt], bool]:
    """llama-server's prompt forms, and whether there were several.

    A string, token ids, a mix ([12, "text", 34], one sequence), {"prompt_string": ...}, or a list of
    any of these (several prompts: a list holding an integer is one mixed sequence instead).
    """
    if value is None:
        raise ApiError(400, f"'{name}' is required: a string, a list of token ids, or a list of prompts", param=name)
    if isinstance(value, list) and value and not any(_is_token(v) for v in value):
        return [_one_prompt(engine, v, f"{name}[{i}]") for i, v in enumerate(value)], True
    return [_one_prompt(engine, value, name)], False


def _one_prompt(engine: Engine, value: Any, name: str) -> Prompt:
    if isinstance(value, dict):
        part = Body(value, prefix=f"{name}.")
        if part.array("multimodal_data"):
            raise part.fail("multimodal_data", "is not supported: this model reads text only")
        value = part.string("prompt_string", required=True)
    return Prompt(tokens=token_sequence(engine, value, add_special=True, name=name))


def token_sequence(engine: Engine, value: Any, *, add_special: bool, name: str) -> list[int]:
    """A string or a mix of strings and token ids as one token list; BOS (where the model wants one)
    only when `add_special` and the sequence starts with text, as llama-server tokenizes."""
    parts = [value] if isinstance(value, str) else value
    if not isinstance(parts, list) or not all(isinstance(p, str) or _is_token(p) for p in parts):
        raise ApiError(400, f"'{name}' must be a string, a list of token ids, or a list mixing both", param=name)
    tokens: list[int] = []
    for i, part in enumerate(parts):
        if isinstance(part, str):
            bos = add_special and i == 0
            tokens += engine.text_prompt(part, add_bos=True).tokens if bos else (engine.tokenize(part, add_bos=False) if part else [])
        else:
            tokens.append(part)
    return tokens


# --- /completion: answering ----------------------------------------------------------------------


async def completion(request: Request) -> Response:
    body = await read_json(request)
    prompts, several = await run_in_threadpool(read_prompts, request.app.state.engine, body.raw("prompt"))
    return await _answer(request, body, prompts, several)


async def infill(request: Request) -> Response:
    """llama-server's /infill: a /completion whose prompt is built from the code around the cursor."""
    body = await read_json(request)
    prompt = await run_in_threadpool(_infill_prompt, body, request.app.state.engine, request.app.state.settings)
    return await _answer(request, body, [prompt], False)


def _infill_prompt(body: Body, engine: Engine, settings: ServerSettings) -> Prompt:
    fim = engine.fim_tokens()
    if fim.missing():
        raise ApiError(400, f"Infill is not supported by this model: {fim.missing().strip()} Use a code model with fill-in-the-middle tokens.")
    pieces = {}
    for name in ("input_prefix", "input_suffix"):
        if body.raw(name) is None:
            raise body.fail(name, "is required: the code before (input_prefix) and after (input_suffix) the cursor")
        pieces[name] = token_sequence(engine, body.raw(name), add_special=False, name=name)
    prompt = body.string("prompt") or ""
    extra = []
    for i, chunk in enumerate(body.array("input_extra") or []):
        if not isinstance(chunk, dict):
            raise body.fail("input_extra", 'must be an array of {"filename": string, "text": string}')
        part = Body(chunk, prefix=f"input_extra[{i}].")
        extra.append((part.string("filename") or "tmp", part.string("text", required=True) or ""))
    request = InfillRequest(pieces["input_prefix"], pieces["input_suffix"], engine.tokenize(prompt, add_bos=False) if prompt else [], extra)
    n_predict = settings.defaults.max_tokens or -1  # the server's -n, as llama-server budgets the other files by it
    tokens = infill_tokens(fim, request, lambda text: engine.tokenize(text, add_bos=False) if text else [], engine.batch_size, engine.n_ctx, n_predict)
    return Prompt(tokens=tokens)


async def _answer(request: Request, body: Body, prompts: list[Prompt], several: bool) -> Response:
    """Generate for `prompts` as /completion answers, streamed (SSE) or whole."""
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    options = await run_in_threadpool(_options, body, engine, settings)
    for prompt in prompts:
        if len(prompt.tokens) >= engine.n_ctx:
            raise ContextExceeded(len(prompt.tokens), engine.n_ctx)
    texts = await run_in_threadpool(lambda: [_prompt_text(engine, p) for p in prompts])
    answers = [Answer(i, prompt, text, options) for i, (prompt, text) in enumerate(zip(prompts, texts))]
    generations: list[Generation] = []
    try:
        for prompt in prompts:
            generations.append(Generation(engine, prompt, options.sampling))
    except BaseException:
        _close(generations)
        raise
    if options.stream:
        return sse(_events(generations, answers), llama_cpp_error)
    try:
        finals = await asyncio.gather(*(_whole(g, a) for g, a in zip(generations, answers)))
    finally:
        _close(generations)
    return JSONResponse(finals if several else finals[0])


def _prompt_text(engine: Engine, prompt: Prompt) -> str:
    try:
        return engine.detokenize(prompt.tokens)
    except Exception:  # an id outside the vocabulary: the engine refuses the prompt next, with its message
        return ""


def _close(generations: list[Generation]) -> None:
    for generation in generations:
        generation.close()


async def _whole(generation: Generation, answer: Answer) -> dict[str, Any]:
    async for _, chunk in generation.chunks():
        answer.feed(chunk)
    return answer.final(streamed=False)


async def _events(generations: list[Generation], answers: list[Answer]) -> AsyncIterator[dict[str, Any]]:
    """Each prompt's partial events, then its final one; several prompts one after the other (each
    generates meanwhile in its own slot), told apart by `index`."""
    try:
        for generation, answer in zip(generations, answers):
            async for _, chunk in generation.chunks():
                partial = answer.feed(chunk)
                if partial is not None:
                    yield partial
            yield answer.final(streamed=True)
    finally:
        _close(generations)


class Answer:
    """One prompt's answer, built from the engine's pieces: streamed partial events and the final object."""

    def __init__(self, index: int, prompt: Prompt, prompt_text: str, options: Options) -> None:
        self.index, self.prompt, self.prompt_text, self.options = index, prompt, prompt_text, options
        self.texts: list[str] = []
        self.tokens: list[TokenLogprob] = []
        self.last: Chunk | None = None
        self.started, self.first_at = time.perf_counter(), 0.0

    def feed(self, chunk: Chunk) -> dict[str, Any] | None:
        """Take a piece; returns its partial event (None when there is nothing to send)."""
        self.first_at = self.first_at or time.perf_counter()
        new = list(chunk.logprobs)
        if self.options.evaluate_only:
            self.tokens += new
            self.last = chunk if chunk.finish_reason else self.last
            if chunk.finish_reason and self.options.n_probs and self.tokens:
                return self._partial("", [], self.tokens[:1])
            return None
        self.tokens += new
        if chunk.finish_reason:
            self.last = chunk
            new = self._in_content(new, len(self.tokens) - len(new), "".join(self.texts) + chunk.text)
        self.texts.append(chunk.text)
        if not chunk.text and not new:
            return None
        return self._partial(chunk.text, [lp.token for lp in new], new)

    def _partial(self, text: str, tokens: list[int], probabilities: list[TokenLogprob]) -> dict[str, Any]:
        event: dict[str, Any] = {
            "index": self.index, "content": text, "tokens": tokens, "stop": False, "id_slot": -1,
            "tokens_predicted": self._predicted(len(self.tokens)), "tokens_evaluated": len(self.prompt.tokens),
        }
        if self.options.n_probs:
            event["completion_probabilities"] = [_probability(lp) for lp in probabilities]
        if self.options.timings_per_token:
            now = time.perf_counter()  # measured here, between the engine's pieces; the final event has the engine's own
            so_far = Timings((self.first_at - self.started) * 1000, (now - self.first_at) * 1000)
            event["timings"] = timings_of(Chunk("", None, len(self.prompt.tokens), self._predicted(len(self.tokens)), timings=so_far))
        return event

    def _predicted(self, n: int) -> int:
        return 0 if self.options.evaluate_only else n

    def _in_content(self, tokens: list[TokenLogprob], start: int, content: str) -> list[TokenLogprob]:
        """Of `tokens` (the answer's tokens from `start` on), those that begin inside `content` (not in a stop string)."""
        limit, offset = len(content.encode()), sum(len(lp.piece) for lp in self.tokens[:start])
        kept = []
        for lp in tokens:
            if offset >= limit:
                break
            kept.append(lp)
            offset += len(lp.piece)
        return kept

    def final(self, *, streamed: bool) -> dict[str, Any]:
        """The final object: llama-server's fields (content and tokens empty when streamed: already sent),
        with llamafile's stopped_* booleans."""
        last = self.last or Chunk("", "cancelled")
        options = self.options
        content = "" if options.evaluate_only else "".join(self.texts)
        predicted = self._predicted(last.completion_tokens)
        stop_type, stopping_word = self._stop(last)
        limit = options.sampling.max_tokens
        # As llama-server: the context ran out, or was shifted (older tokens dropped) on the way.
        full = last.finish_reason == "length" and not options.evaluate_only and (limit is None or predicted < limit)
        truncated = full or last.context_dropped > 0
        answer: dict[str, Any] = {
            "index": self.index,
            "content": "" if streamed else content,
            "tokens": [lp.token for lp in self.tokens] if options.return_tokens and not streamed and not options.evaluate_only else [],
            "id_slot": -1,
            "stop": True,
            "model": options.model,
            "tokens_predicted": predicted,
            "tokens_evaluated": len(self.prompt.tokens),
            "generation_settings": options.settings,
            "prompt": self.prompt_text,
            "has_new_line": "\n" in content,
            "truncated": truncated,
            "stop_type": stop_type,
            "stopping_word": stopping_word,
            "stopped_eos": stop_type == "eos",
            "stopped_word": stop_type == "word",
            "stopped_limit": stop_type == "limit",
            "tokens_cached": len(self.prompt.tokens) + predicted,
            "timings": self._timings(last),
        }
        if options.n_probs and not streamed:
            kept = self.tokens[:1] if options.evaluate_only else self._in_content(self.tokens, 0, content)
            answer["completion_probabilities"] = [_probability(lp) for lp in kept]
        return _only(answer, options.response_fields)

    def _timings(self, last: Chunk) -> dict[str, float]:
        if self.options.evaluate_only:  # the token sampled for its probabilities is no answer: nothing was predicted
            last = replace(last, completion_tokens=0, timings=Timings((last.timings or Timings()).prompt_ms, 0.0))
        return timings_of(last)

    def _stop(self, last: Chunk) -> tuple[str, str]:
        """stop_type eos, word or limit, and the stop string that ended the text."""
        if self.options.evaluate_only or last.finish_reason != "stop":
            return "limit", ""
        return ("word", last.stop_word) if last.stop_word else ("eos", "")


def _probability(lp: TokenLogprob) -> dict[str, Any]:
    """llama-server's completion_probabilities entry: the chosen token and the most likely ones, with log-probabilities."""
    return {
        "id": lp.token, "token": lp.piece.decode("utf-8", errors="ignore"), "bytes": list(lp.piece), "logprob": lp.logprob,
        "top_logprobs": [{"id": t, "token": p.decode("utf-8", errors="ignore"), "bytes": list(p), "logprob": v} for t, p, v in lp.top],
    }


def _only(answer: dict[str, Any], fields: list[str] | None) -> dict[str, Any]:
    """response_fields: only these fields, a nested one ("generation_settings/n_predict") under its path."""
    if fields is None:
        return answer
    picked = {}
    for path in fields:
        value: Any = answer
        for key in path.split("/"):
            value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
        if value is not _MISSING:
            picked[path] = value
    return picked


_MISSING = object()


# --- tokens --------------------------------------------------------------------------------------


async def tokenize(request: Request) -> Response:
    """Token ids of `content` (text, or text mixed with ids); `with_pieces` adds each token's text."""
    body = await read_json(request)
    engine: Engine = request.app.state.engine
    if body.boolean("parse_special") is False:
        raise body.fail("parse_special", "false is not supported: special tokens written in the text are always parsed")
    add_special = bool(body.boolean("add_special"))
    with_pieces = bool(body.boolean("with_pieces"))
    if "content" not in body:
        return JSONResponse({"tokens": []})
    tokens = await run_in_threadpool(token_sequence, engine, body.raw("content"), add_special=add_special, name="content")
    if not with_pieces:
        return JSONResponse({"tokens": tokens})
    return JSONResponse({"tokens": await run_in_threadpool(_with_pieces, engine, tokens)})


def _with_pieces(engine: Engine, tokens: list[int]) -> list[dict[str, Any]]:
    engine.detokenize(tokens)  # refuses ids outside the vocabulary
    return [{"id": t, "piece": _piece(engine.token_text([t]))} for t in tokens]


def _piece(raw: bytes) -> str | list[int]:
    """A token's text, or its bytes where they are not whole UTF-8 (a piece of a character)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


async def detokenize(request: Request) -> Response:
    body = await read_json(request)
    engine: Engine = request.app.state.engine
    tokens = body.array("tokens") or []
    if not all(_is_token(t) for t in tokens):
        raise body.fail("tokens", "must be a list of token ids")
    return JSONResponse({"content": await run_in_threadpool(engine.detokenize, tokens)})


# --- embeddings ----------------------------------------------------------------------------------


async def embedding(request: Request) -> Response:
    """Today's llama-server shape: one {"index", "embedding": [[...]]} per input (pooled: one row)."""
    body = await read_json(request)
    engine: Engine = request.app.state.engine
    name = "input" if "input" in body and "content" not in body else "content"
    norm = body.integer("embd_normalize", maximum=1000)
    norm = 2 if norm is None else norm
    if norm < 0:
        raise body.fail("embd_normalize", "must be 0 (max absolute), 1 (taxicab), 2 (euclidean, the default) or a p-norm above 2; llamabox has no unnormalized embeddings")
    prompts, _ = await run_in_threadpool(read_prompts, engine, body.raw(name), name)
    vectors = await run_in_threadpool(lambda: [engine.embed(_embedding_text(engine, p)) for p in prompts])
    return JSONResponse([{"index": i, "embedding": [_normalized(v, norm)]} for i, v in enumerate(vectors)])


# --- reranking -----------------------------------------------------------------------------------


async def rerank(request: Request) -> Response:
    """llama-server's reranking: `query` against each of `documents`, answered in Jina's shape ({"results": [{"index",
    "relevance_score"}], "usage", ...}); with `texts` instead of `documents`, in TEI's ([{"index", "score"}], and
    "text" with return_text). Best first, the first `top_n`; the scores are the ranking head's raw outputs."""
    engine: Engine = request.app.state.engine
    settings: ServerSettings = request.app.state.settings
    if not engine.reranks:
        raise ApiError(
            501, "This server does not support reranking. Start it with `--reranking` and a model with a ranking head, or "
            "bundle a reranker with `llamabox build MODEL --reranker R.gguf`",
        )
    body = await read_json(request)
    query = body.string("query", required=True)
    tei = "texts" in body
    name = "texts" if tei else "documents"
    documents = body.raw(name)
    if not isinstance(documents, list) or not documents or not all(isinstance(d, str) for d in documents):
        raise body.fail(name, "must be a non-empty string array")
    top_n = body.integer("top_n", minimum=0)
    return_text = tei and bool(body.boolean("return_text"))
    scored = await run_in_threadpool(engine.rerank, query or "", documents)
    label = "score" if tei else "relevance_score"
    results = [{"index": i, label: score, **({"text": documents[i]} if return_text else {})} for i, (score, _) in enumerate(scored)]
    results = sorted(results, key=lambda r: -r[label])[: len(results) if top_n is None else top_n]
    if tei:
        return JSONResponse(results)
    used = sum(tokens for _, tokens in scored)
    model = body.raw("model")
    return JSONResponse({
        "model": model if isinstance(model, str) else settings.model_id, "object": "list",
        "usage": {"prompt_tokens": used, "total_tokens": used}, "results": results,
    })


def _embedding_text(engine: Engine, prompt: Prompt) -> str:
    """The text to embed (the embedder adds BOS itself where the model wants one)."""
    return engine.detokenize(prompt.tokens)


def _normalized(vector: list[float], norm: int) -> list[float]:
    """The engine's unit vector under llama-server's embd_normalize (all norms are scale-free, so the unit vector serves)."""
    largest = max((abs(x) for x in vector), default=0.0)
    if norm == 2 or largest == 0:
        return vector
    if norm == 0:
        size = largest / INT16_RANGE
    elif norm == 1:
        size = sum(abs(x) for x in vector)
    else:  # a p-norm, computed relative to the largest component so that a large p cannot overflow
        size = largest * sum((abs(x) / largest) ** norm for x in vector) ** (1.0 / norm)
    return [x / size for x in vector]

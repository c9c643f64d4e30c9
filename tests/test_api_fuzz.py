"""Malformed and extreme request bodies against every POST route of every API family, on one running bundle.

Three parts, all against the session's `server`:
- a fixed list of raw payloads (empty, not JSON, not an object, NaN, 1e999, deep nesting, bad UTF-8,
  wrong content types) sent to every route;
- a fixed list of well-formed bodies that are hard on the grammar machinery (huge lengths and counts
  in JSON schemas, deep nesting, GBNF that allows no text), through every way a route takes a schema;
- a property-based run (hypothesis): each route's valid body with one to three fields replaced or
  added, drawn from the field names the families use, values shaped like the field wants with wrong
  parts inside, wrong types, nulls, huge and negative numbers, long strings and nested junk. Bodies
  stay short to generate: the length field stays small unless it is the field being mutated.
Every answer must be below 500 and carry a reason, the server's stderr must show no traceback, its
memory must not balloon (its address space is capped meanwhile, so a runaway request fails here
instead of taking the machine's memory), and afterwards a normal request must be answered correctly.
LLAMABOX_FUZZ_EXAMPLES sets the number of property-based cases (default 400).
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import Server

pytestmark = pytest.mark.slow

SAY_OK = [{"role": "user", "content": "Say OK."}]
EXAMPLES = int(os.environ.get("LLAMABOX_FUZZ_EXAMPLES", "400"))
TIMEOUT = 60  # seconds per request; a valid but huge length may generate for a while


@dataclass(frozen=True)
class Route:
    body: dict[str, Any]
    length: tuple[Any, ...] | None = None  # where the body says how many tokens to generate
    fields: tuple[str, ...] = ()  # more top-level fields this route reads
    refused: int | None = None  # a status the route answers on purpose to any body (as llama-server does)


OPENAI_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "presence_penalty", "frequency_penalty", "repeat_penalty", "logit_bias", "stream", "stream_options", "user")
OLLAMA_FIELDS = ("format", "system", "template", "raw", "keep_alive", "images", "suffix", "context", "think", "tools", "logprobs", "top_logprobs", "stream", "options")
NATIVE_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "stop", "grammar", "json_schema", "seed", "cache_prompt", "n_probs", "logit_bias", "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty", "samplers", "stream", "return_tokens", "response_fields", "timings_per_token", "tokens", "multimodal_data")

ROUTES: dict[str, Route] = {
    "/v1/chat/completions": Route(
        {"model": "any", "messages": SAY_OK, "max_tokens": 3},
        ("max_tokens",),
        (*OPENAI_SAMPLING, "max_completion_tokens", "n", "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls"),
    ),
    "/chat/completions": Route({"messages": SAY_OK, "max_tokens": 3}, ("max_tokens",), (*OPENAI_SAMPLING, "n", "tools", "tool_choice")),
    "/v1/completions": Route(
        {"model": "any", "prompt": "Hello", "max_tokens": 3},
        ("max_tokens",),
        (*OPENAI_SAMPLING, "n", "logprobs", "echo", "suffix", "best_of"),
    ),
    "/v1/embeddings": Route({"model": "any", "input": "hello"}, None, ("encoding_format", "dimensions", "user")),
    "/v1/responses": Route(
        {"model": "any", "input": "Say OK.", "max_output_tokens": 16},
        ("max_output_tokens",),
        ("instructions", "stream", "tools", "tool_choice", "text", "temperature", "top_p", "previous_response_id", "store", "reasoning", "metadata", "include", "background", "parallel_tool_calls", "top_logprobs", "user"),
    ),
    "/v1/messages": Route(
        {"model": "any", "max_tokens": 3, "messages": SAY_OK},
        ("max_tokens",),
        ("system", "stop_sequences", "stream", "temperature", "top_p", "top_k", "tools", "tool_choice", "metadata", "thinking", "output_config"),
    ),
    "/v1/messages/count_tokens": Route({"model": "any", "messages": SAY_OK}, None, ("system", "tools", "tool_choice", "thinking")),
    "/completion": Route({"prompt": "Hello", "n_predict": 3}, ("n_predict",), NATIVE_SAMPLING),
    "/completions": Route({"prompt": "Hello", "n_predict": 3}, ("n_predict",), NATIVE_SAMPLING),
    "/infill": Route({"input_prefix": "def f():", "input_suffix": "", "n_predict": 3}, ("n_predict",), (*NATIVE_SAMPLING, "input_extra", "prompt")),
    "/apply-template": Route({"messages": SAY_OK}, None, ("tools", "tool_choice")),
    "/tokenize": Route({"content": "Hello"}, None, ("add_special", "parse_special", "with_pieces")),
    "/detokenize": Route({"tokens": [1, 2, 3]}, None, ()),
    "/embedding": Route({"content": "hello"}, None, ("embd_normalize", "input")),
    "/embeddings": Route({"content": "hello"}, None, ("embd_normalize", "input")),
    "/props": Route({}, None, ("slot_id", "n_ctx"), refused=501),  # settings are fixed at start, as llama-server without --props
    "/api/generate": Route({"model": "any", "prompt": "Say OK.", "stream": False, "options": {"num_predict": 3}}, ("options", "num_predict"), OLLAMA_FIELDS),
    "/api/chat": Route({"model": "any", "messages": SAY_OK, "stream": False, "options": {"num_predict": 3}}, ("options", "num_predict"), OLLAMA_FIELDS),
    "/api/embed": Route({"model": "any", "input": "hello"}, None, ("truncate", "options", "dimensions", "keep_alive")),
    "/api/embeddings": Route({"model": "any", "prompt": "hello"}, None, ("options", "keep_alive")),
    "/api/show": Route({"model": "any"}, None, ("name", "verbose")),
    "/api/pull": Route({"model": "any", "stream": False}, None, ("name", "insecure")),
}

# Names that reach deeper code: nested fields of messages, content parts, tools, formats and options.
NESTED_KEYS = (
    "role", "content", "type", "text", "name", "arguments", "function", "parameters", "input_schema", "input",
    "tool_calls", "tool_call_id", "tool_use_id", "id", "call_id", "is_error", "image_url", "url", "source", "images",
    "json_schema", "schema", "strict", "format", "properties", "items", "required", "enum", "$ref", "$defs", "anyOf",
    "oneOf", "allOf", "pattern", "minItems", "maxItems", "minimum", "maximum", "minLength", "maxLength",
    "additionalProperties", "const", "description", "include_usage", "num_predict", "num_ctx", "temperature", "top_k",
    "top_p", "seed", "stop", "mirostat", "repeat_last_n", "tfs_z", "typical_p", "budget_tokens", "effort", "output",
)
WORDS = (
    "user", "assistant", "system", "developer", "tool", "function", "json_object", "json_schema", "json", "text",
    "input_text", "output_text", "image_url", "tool_use", "tool_result", "function_call", "function_call_output",
    "message", "auto", "required", "none", "any", "object", "array", "string", "integer", "number", "boolean", "null",
    "enabled", "disabled", "root ::= \"a\"", "root ::= ", "#/$defs/x", "get_weather", "{}", "{\"a\": 1}", "[DONE]",
)
HUGE_STRING = "a" * 200_000


def scalars() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.sampled_from([0, -1, 1, 2, 2**31 - 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from([0.5, -0.0, 1e308, -1e308, 5e-324, 3.0, 1e-300]),
        st.text(max_size=30),
        st.sampled_from(WORDS),
        st.sampled_from(["", " ", "\x00", "\ud800", "\ud83d", "\u202e", "\ufffd" * 50, "<|im_start|>", "<|endoftext|>", HUGE_STRING]),
    )


def json_values() -> st.SearchStrategy[Any]:
    keys = st.one_of(st.sampled_from(NESTED_KEYS), st.text(max_size=8))
    return st.recursive(
        scalars(),
        lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(keys, inner, max_size=5)),
        max_leaves=20,
    )


def deep(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = {"type": "object", "properties": {"a": value}} if i % 2 else [value]
    return value


def schemas() -> st.SearchStrategy[Any]:
    """JSON-schema-shaped values with wrong parts: they reach llama.cpp's schema-to-grammar converter."""
    keyword = st.sampled_from(("type", "properties", "items", "required", "enum", "const", "$ref", "$defs", "anyOf", "oneOf", "allOf",
                               "pattern", "format", "minItems", "maxItems", "minLength", "maxLength", "minimum", "maximum",
                               "additionalProperties", "prefixItems"))
    leaf = st.one_of(scalars(), st.sampled_from(["object", "array", "string", "integer", "number", "boolean", "null",
                                                 "#/$defs/a", "#", "#/properties/x", "date-time", "uuid", "^a+$", "(", "[a-"]))
    return st.recursive(
        st.fixed_dictionaries({"type": st.sampled_from(["object", "array", "string", "integer", "x"])}),
        lambda inner: st.one_of(
            st.dictionaries(keyword, st.one_of(leaf, inner, st.lists(st.one_of(leaf, inner), max_size=3)), max_size=4),
            st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(st.text(max_size=6), inner, max_size=3)},
                                  optional={"required": st.lists(st.text(max_size=6), max_size=3)}),
        ),
        max_leaves=12,
    )


def messages() -> st.SearchStrategy[Any]:
    """Lists of message-shaped objects with wrong roles, contents, parts and tool calls."""
    part = st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "input_text", "image_url", "image", "tool_use", "tool_result", "document", "x"])},
        optional={"text": scalars(), "content": scalars(), "id": scalars(), "name": scalars(), "input": json_values(),
                  "tool_use_id": scalars(), "image_url": json_values(), "source": json_values()},
    )
    call = st.fixed_dictionaries({"id": scalars(), "type": st.just("function"),
                                  "function": st.fixed_dictionaries({"name": scalars(), "arguments": json_values()})})
    message = st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "developer", "tool", "function", "x"])},
        optional={"content": st.one_of(scalars(), st.lists(part, max_size=3)), "tool_calls": st.lists(call, max_size=2),
                  "tool_call_id": scalars(), "name": scalars(), "images": json_values(), "type": st.sampled_from(["message", "function_call_output"])},
    )
    return st.lists(message, max_size=4)


def tools() -> st.SearchStrategy[Any]:
    """Tool lists in each family's shape, with junk names and schemas."""
    name = st.one_of(st.sampled_from(["get_weather", "", "a b", "x" * 300]), scalars())
    openai = st.builds(lambda n, s: {"type": "function", "function": {"name": n, "parameters": s}}, name, schemas())
    flat = st.builds(lambda n, s: {"type": "function", "name": n, "parameters": s}, name, schemas())
    anthropic = st.builds(lambda n, s: {"name": n, "input_schema": s}, name, schemas())
    return st.lists(st.one_of(openai, flat, anthropic), max_size=3)


GRAMMARS = ('root ::= "a"', "root ::= root", "root ::= [", "x ::= \"a\"", "root ::= " + "(" * 2000, 'root ::= "a"*',
            "root ::= [^\\x00-\\U0010FFFF]", "root ::= \"\\", "", "root ::= x\nx ::= y\ny ::= x")

# Values shaped like what each field wants, with wrong parts inside: they get past the first type checks.
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "messages": messages(),
    "input": st.one_of(messages(), scalars()),
    "tools": tools(),
    "response_format": st.builds(lambda t, s: {"type": t, "json_schema": {"name": "x", "schema": s}},
                                 st.sampled_from(["json_schema", "json_object", "text", "x"]), schemas()),
    "json_schema": schemas(),
    "format": st.one_of(st.just("json"), schemas()),
    "text": st.builds(lambda s: {"format": {"type": "json_schema", "name": "x", "schema": s}}, schemas()),
    "output_config": st.builds(lambda s: {"format": {"type": "json_schema", "schema": s}}, schemas()),
    "tool_choice": st.one_of(st.sampled_from(["auto", "required", "none", "any", "x"]),
                             st.builds(lambda n: {"type": "function", "function": {"name": n}}, scalars()),
                             st.builds(lambda n: {"type": "tool", "name": n}, scalars()),
                             st.builds(lambda n: {"type": "function", "name": n}, scalars())),
    "grammar": st.sampled_from(GRAMMARS),
    "logit_bias": st.dictionaries(st.one_of(st.integers(-(2**40), 2**40).map(str), st.text(max_size=5)), scalars(), max_size=4),
    "stop": st.one_of(st.lists(st.text(max_size=5), max_size=40), scalars()),
    "stop_sequences": st.lists(st.text(max_size=5), max_size=40),
    "options": st.dictionaries(st.sampled_from(("num_predict", "num_ctx", "temperature", "top_k", "top_p", "min_p", "seed", "stop",
                                                "repeat_penalty", "repeat_last_n", "mirostat", "tfs_z", "typical_p", "num_gpu")),
                               scalars(), max_size=4),
    "samplers": st.lists(st.sampled_from(["top_k", "top_p", "min_p", "temperature", "penalties", "dry", "x", ""]), max_size=8),
    "tokens": st.lists(st.integers(-(2**40), 2**40), max_size=5),
    "system": st.one_of(scalars(), st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": scalars()}), max_size=2)),
}

SPECIALS = st.sampled_from([deep(50), deep(400), deep(200, {"$ref": "#"}), [SAY_OK[0]] * 300, {"": None}, [[]], [{}]])


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value: keys of objects and indexes of lists, depth first."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths_of(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths_of(item, (*prefix, index))
    return found


def put(body: Any, path: tuple[Any, ...], value: Any) -> Any:
    """A copy of body with the value at path replaced (or added to an object); unchanged if the path is gone."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(body, dict):
        return {**body, head: put(body.get(head), rest, value)} if rest else {**body, head: value}
    if isinstance(body, list) and isinstance(head, int) and head < len(body):
        return [put(item, rest, value) if i == head else item for i, item in enumerate(body)]
    return body


@st.composite
def mutated(draw: Callable[..., Any], name: str) -> dict[str, Any]:
    """The route's body with one to three places replaced by junk; the length field kept small otherwise."""
    route = ROUTES[name]
    body: Any = json.loads(json.dumps(route.body))
    touched: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 3))):
        places = paths_of(body) + [(f,) for f in route.fields] + [("messages", 0, k) for k in NESTED_KEYS[:12] if "messages" in route.body]
        place = draw(st.sampled_from(places)) if places else (draw(st.sampled_from(NESTED_KEYS)),)
        if draw(st.integers(0, 9)) == 0:  # a new field nobody knows
            place = (*place[:-1], draw(st.text(min_size=1, max_size=10)))
        shaped = [FIELD_VALUES[place[-1]]] if place[-1] in FIELD_VALUES else []
        body = put(body, place, draw(st.one_of(*shaped, scalars(), json_values(), SPECIALS)))
        touched.append(place)
    if route.length and not any(p[: len(route.length)] == route.length or route.length[: len(p)] == p for p in touched):
        body = put(body, route.length, 3)
    return body


RAW_JSON = "application/json"
RAW: list[tuple[bytes, str | None]] = [
    (b"", RAW_JSON),
    (b"null", RAW_JSON),
    (b"[]", RAW_JSON),
    (b"123", RAW_JSON),
    (b'"text"', RAW_JSON),
    (b"true", RAW_JSON),
    (b"{", RAW_JSON),
    (b'{"a":}', RAW_JSON),
    (b"NaN", RAW_JSON),
    (b'{"max_tokens": NaN, "temperature": NaN, "n_predict": NaN}', RAW_JSON),
    (b'{"temperature": Infinity, "top_p": -Infinity}', RAW_JSON),
    (b'{"max_tokens": 1e999, "n_predict": 1e999, "seed": 1e999}', RAW_JSON),
    (b'{"seed": 1' + b"0" * 400 + b"}", RAW_JSON),
    (b"[" * 100_000 + b"]" * 100_000, RAW_JSON),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, RAW_JSON),
    (b'{"prompt": "\xff\xfe", "messages": "\xc3\x28"}', RAW_JSON),
    (b"\xef\xbb\xbf{}", RAW_JSON),
    (b'{"max_tokens": 1, "max_tokens": "x"}', RAW_JSON),
    (b'{"prompt": "' + HUGE_STRING.encode() + b'", "content": "' + HUGE_STRING.encode() + b'"}', RAW_JSON),
    (b"{}", "application/json; charset=utf-16"),
    (b"{}", "APPLICATION/JSON"),
    (b"{}", "application/vnd.api+json"),
    (b'{"messages": [{"role": "user", "content": "hi"}]}', "text/plain"),
    (b"messages=hi&prompt=hi", "application/x-www-form-urlencoded"),
    (b"--x\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nb\r\n--x--\r\n", "multipart/form-data; boundary=x"),
    (b"{}", None),
    (b"{}", ""),
]


def schema_places(schema: Any) -> list[tuple[str, dict[str, Any]]]:
    """Every way a route takes a JSON schema, each with this one."""
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    return [
        ("/v1/chat/completions", {"messages": SAY_OK, "max_tokens": 3, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}),
        ("/v1/chat/completions", {"messages": SAY_OK, "max_tokens": 3, "tools": [tool], "tool_choice": "required"}),
        ("/v1/responses", {"input": "Say OK.", "max_output_tokens": 16, "text": {"format": {"type": "json_schema", "name": "x", "schema": schema}}}),
        ("/v1/responses", {"input": "Say OK.", "max_output_tokens": 16, "tools": [{"type": "function", "name": "f", "parameters": schema}], "tool_choice": "required"}),
        ("/v1/messages", {"model": "any", "max_tokens": 3, "messages": SAY_OK, "output_config": {"format": {"type": "json_schema", "schema": schema}}}),
        ("/v1/messages", {"model": "any", "max_tokens": 3, "messages": SAY_OK, "tools": [{"name": "f", "input_schema": schema}], "tool_choice": {"type": "any"}}),
        ("/completion", {"prompt": "Hello", "n_predict": 3, "json_schema": schema}),
        ("/api/generate", {"model": "any", "prompt": "Say OK.", "stream": False, "options": {"num_predict": 3}, "format": schema}),
        ("/api/chat", {"model": "any", "messages": SAY_OK, "stream": False, "options": {"num_predict": 3}, "format": schema}),
    ]


def nested_schema(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


# Well-formed bodies that are hard on the grammar machinery: lengths that expand into huge grammars,
# deep nesting, grammars that allow no text at all. Each once, every run.
HARD: list[tuple[str, dict[str, Any]]] = [
    # Whole numbers too large for a float, where floats are read (Python's JSON keeps them as exact ints).
    *[(path, {**ROUTES[path].body, field: 10**400}) for path in ROUTES for field in ("temperature", "top_p", "repeat_penalty") if path != "/props"],
    *[("/completion", {"prompt": "Hello", "n_predict": 3, "grammar": grammar}) for grammar in (
        "root ::= [^\\x00-\\U0010FFFF]",  # no text at all: llama.cpp aborts when the end token comes
        "root ::= " + "(" * 100_000 + '"a"' + ")" * 100_000,
        'root ::= "a"{100000}',
        'root ::= "a"{1000000000,}',
    )],
    *[case for i, schema in enumerate((
        {"type": "string", "minLength": 10**9},
        {"type": "string", "maxLength": 100_000},
        {"type": "array", "items": {"type": "integer"}, "minItems": 100_000},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 100_000},
        {"type": "object", "properties": {"a": {"type": "string"}}, "minProperties": 10**9},
        {"type": "integer", "minimum": 10**300, "maximum": -(10**300)},
        {"type": "string", "pattern": "^(a{1000}){1000}$"},
        {"enum": []},
        nested_schema(300),
    )) for case in schema_places(schema)[i % 3::3]],  # each schema three ways, each way three times
]


def _processes(pid: int) -> list[int]:
    """A process and all its descendants (the bundle's bootloader, the watcher, the server)."""
    found = [pid]
    try:
        children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    except OSError:  # gone meanwhile
        children = []
    for child in children:
        found += _processes(child)
    return found


@contextmanager
def memory_capped(pid: int, extra: int = 4 << 30) -> Iterator[list[int]]:
    """Cap the server's address space at what it uses now plus `extra`, so that a request that makes it
    allocate without end fails there instead of taking the machine's memory (Linux; elsewhere no cap)."""
    if not sys.platform.startswith("linux"):
        yield []
        return
    pids, saved = _processes(pid), {}
    for p in pids:
        try:
            size = int(Path(f"/proc/{p}/statm").read_text().split()[0]) * resource.getpagesize()
            saved[p] = resource.prlimit(p, resource.RLIMIT_AS)
            resource.prlimit(p, resource.RLIMIT_AS, (size + extra, saved[p][1]))
        except (OSError, ValueError):  # gone meanwhile, or a limit we may not lower
            continue
    try:
        yield pids
    finally:
        for p, limits in saved.items():
            try:
                resource.prlimit(p, resource.RLIMIT_AS, limits)
            except (OSError, ValueError):
                pass


def peak_memory(pids: list[int]) -> int:
    """The largest resident size any of these processes ever had, in bytes (0 where unknown)."""
    peak = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) * 1024)
    return peak


@dataclass
class Tally:
    sent: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    missing_routes: set[str] = field(default_factory=set)
    pids: list[int] = field(default_factory=list)  # the server's processes, whose memory is watched

    def note(self, path: str, response: httpx.Response) -> None:
        self.sent += 1
        self.by_status[response.status_code] = self.by_status.get(response.status_code, 0) + 1
        if response.status_code == 404 and "not found" in response.text.lower() and "model" not in response.text.lower():
            self.missing_routes.add(path)


def drain(process: subprocess.Popen[str]) -> str:
    """What the server wrote to stderr since the last call, without waiting."""
    assert process.stderr is not None
    fd = process.stderr.fileno()
    os.set_blocking(fd, False)
    pieces = []
    try:
        while True:
            try:
                piece = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            if not piece:
                break
            pieces.append(piece)
    finally:
        os.set_blocking(fd, True)
    return b"".join(pieces).decode(errors="replace")


GROWTH_LIMIT = 1 << 30  # a request that makes the server's resident memory peak grow more than this fails


def check(server: Server, client: httpx.Client, tally: Tally, path: str, content: bytes, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type is not None else {}
    peak = peak_memory(tally.pids)
    try:
        response = client.post(server.url.rstrip("/") + path, content=content, headers=headers)
    except httpx.TimeoutException:
        pytest.fail(f"POST {path} took more than {TIMEOUT} s: {content[:300]!r}")
    except httpx.TransportError as exc:
        time.sleep(1)  # let a dying server finish its last words
        pytest.fail(f"POST {path} {content[:300]!r}: the server dropped the connection ({exc}):\n{drain(server.process)[-3000:]}")
    tally.note(path, response)
    log = drain(server.process)
    case = f"POST {path} ({content_type}) {content[:500]!r}"
    assert server.process.poll() is None, f"the server died on {case}:\n{log[-3000:]}"
    refused = response.status_code >= 500 and response.status_code != ROUTES[path].refused
    assert not refused, f"{response.status_code} {response.text[:500]} on {case}:\n{log[-3000:]}"
    assert "Traceback" not in log, f"{case} left in the log:\n{log[-3000:]}"
    # An empty reason in parentheses is an exception without a message, such as a MemoryError, passed off as a 400.
    assert not re.search(r" \(\)[;\"]", response.text), f"{response.status_code} {response.text[:300]} on {case}"
    grown = peak_memory(tally.pids) - peak
    assert grown < GROWTH_LIMIT, f"{case} made the server's memory grow by {grown / 2**30:.1f} GiB"


def test_fuzz_every_post_route(server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    tally, started = Tally(), time.monotonic()
    drain(server.process)  # what earlier tests left is theirs
    with httpx.Client(timeout=TIMEOUT) as client, memory_capped(server.pid) as tally.pids:
        for path in ROUTES:
            for content, content_type in RAW:
                check(server, client, tally, path, content, content_type)
        for path, body in HARD:
            check(server, client, tally, path, json.dumps(body).encode(), "application/json")

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
        )
        @given(st.sampled_from(sorted(ROUTES)).flatmap(lambda path: st.tuples(st.just(path), mutated(path))))
        def fuzz(case: tuple[str, dict[str, Any]]) -> None:
            path, body = case
            check(server, client, tally, path, json.dumps(body).encode(), "application/json")

        fuzz()

        answer = client.post(server.url + "v1/chat/completions", json={"messages": SAY_OK, "max_tokens": 8, "temperature": 0})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"].strip()
        assert 0 < answer.json()["usage"]["completion_tokens"] <= 8
        assert client.get(server.url + "health").json()["status"] == "ok"
    with capsys.disabled():
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(tally.by_status.items()))
        print(f"\nfuzz: {tally.sent} cases to {len(ROUTES)} POST routes, no 5xx but POST /props's 501, no traceback in {time.monotonic() - started:.0f} s ({statuses})")
        if tally.missing_routes:
            print(f"fuzz: these routes answered 404 (not served yet?): {', '.join(sorted(tally.missing_routes))}")

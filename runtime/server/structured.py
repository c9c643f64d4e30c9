"""Structured output for every dialect: JSON (any, or to a schema) and tool calls, held by llama.cpp grammars.

The grammars come from llama.cpp's own JSON-schema conversion (llama_cpp.llama_grammar), so a
constrained answer always parses and validates. Tools are described in OpenAI's shape
({"type": "function", "function": {name, description, parameters}}); each dialect converts its own
tools and tool messages to that shape, which is also what chat templates expect.

Models whose chat template renders tools get them through the template; for the others the tools
are described in a system message, and a call is a JSON object {"name": ..., "arguments": {...}}.
A forced call (`required`, or one tool named) is held to that shape by a grammar; with `auto` the
answer is read as a call only if it parses as one.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from runtime.engine import Engine, Prompt
from runtime.server.errors import ApiError

# Counted bounds become counted repetitions in the grammar, which llama.cpp expands into rules (and
# the converter into text): beyond this a schema would exhaust memory or crash the parser.
MAX_SCHEMA_COUNT = 1000
COUNTED = ("minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties")


def json_grammar(schema: dict[str, Any] | None, param: str) -> str:
    """GBNF for any JSON object (schema None) or for JSON valid under `schema`."""
    if schema is None:
        return JSON_GBNF
    _check_counts(schema, param)
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter walks any JSON it is given and fails with whatever it trips on
        raise ApiError(400, f"the JSON schema cannot be enforced ({exc}); llama.cpp supports most of JSON Schema draft 2020-12", param=param) from None


def _check_counts(schema: Any, param: str) -> None:
    stack, seen = [schema], 0
    while stack:  # iterative: a deeply nested schema must not exhaust Python's stack either
        node = stack.pop()
        seen += 1
        if seen > 100_000:
            raise ApiError(400, "the JSON schema is too large to enforce", param=param)
        if isinstance(node, dict):
            for key in COUNTED:
                value = node.get(key)
                if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_SCHEMA_COUNT:
                    raise ApiError(400, f"the JSON schema's {key} of {value} is too large to enforce (at most {MAX_SCHEMA_COUNT})", param=param)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


def new_call_id(prefix: str = "call_") -> str:
    return prefix + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class ToolUse:
    """The tools a request offers and how it lets the model use them.

    `choice` is "auto", "none", "required" (some tool) or the name of the one tool to call.
    """

    tools: tuple[Tool, ...] = ()
    choice: str = "auto"

    def __post_init__(self) -> None:
        names = {tool.name for tool in self.tools}
        if self.choice not in ("auto", "none", "required") and self.choice not in names:
            raise ApiError(400, f"tool_choice names '{self.choice}', which is not among the tools", param="tool_choice")
        if self.choice == "required" and not self.tools:
            raise ApiError(400, "tool_choice requires a tool call but no tools were given", param="tool_choice")

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.active and self.choice != "auto"

    def grammar(self) -> str | None:
        """For a forced call: GBNF that admits only a call to an allowed tool with valid arguments."""
        if not self.forced:
            return None
        allowed = [t for t in self.tools if self.choice in ("required", t.name)]
        schema = {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": t.parameters or {"type": "object"}},
                    "required": ["name", "arguments"],
                }
                for t in allowed
            ]
        }
        return json_grammar(schema, param="tools")

    def prompt(self, engine: Engine, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None = None) -> Prompt:
        """The chat prompt, with the tools given to the template or described in a system message, and a request's
        chat_template_kwargs."""
        if not self.active:
            return engine.chat_prompt(_plain_history(messages), template_kwargs=template_kwargs)
        if engine.template_knows_tools:
            return engine.chat_prompt(_with_argument_objects(messages), tools=[t.openai() for t in self.tools], template_kwargs=template_kwargs)
        described = "\n".join(json.dumps(t.openai()["function"], ensure_ascii=False) for t in self.tools)
        instructions = (
            "You can call these tools:\n" + described + "\nTo call a tool, answer with only a JSON object "
            '{"name": <tool name>, "arguments": <arguments object>}.'
        )
        history = _plain_history(messages)
        if history and history[0]["role"] == "system":
            history = [{"role": "system", "content": history[0]["content"] + "\n\n" + instructions}, *history[1:]]
        else:
            history = [{"role": "system", "content": instructions}, *history]
        return engine.chat_prompt(history, template_kwargs=template_kwargs)

    def parse(self, text: str) -> list[ToolCall]:
        """The tool calls in a generated answer (none if it is not a call to one of the tools)."""
        if not self.active:
            return []
        names = {t.name for t in self.tools}
        calls = []
        for candidate in _json_candidates(text):
            if isinstance(candidate, dict) and candidate.get("name") in names:
                arguments = candidate.get("arguments", candidate.get("parameters", {}))
                if isinstance(arguments, str):
                    try:
                        arguments = json.loads(arguments)
                    except ValueError:
                        continue
                if isinstance(arguments, dict):
                    calls.append(ToolCall(new_call_id(), candidate["name"], arguments))
        return calls


_FENCES = re.compile(r"^\s*(?:```(?:json)?|<tool_call>)\s*|\s*(?:```|</tool_call>)\s*$")


def _json_candidates(text: str) -> list[Any]:
    """The answer as JSON: one object, a list of them, or several <tool_call> blocks."""
    blocks = re.findall(r"<tool_call>(.*?)</tool_call>", text, flags=re.S) or [text]
    found: list[Any] = []
    for block in blocks:
        try:
            value = json.loads(_FENCES.sub("", block.strip()))
        except ValueError:
            return []
        found.extend(value if isinstance(value, list) else [value])
    return found


def _plain_history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool calls and tool results as plain text, for templates that know no tools."""
    plain = []
    for message in messages:
        role, content = message.get("role", "user"), message.get("content") or ""
        calls = message.get("tool_calls") or []
        if role == "assistant" and calls:
            written = [json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)}, ensure_ascii=False) for c in calls]
            content = "\n".join([content, *written]).strip()
        elif role == "tool":
            name = message.get("name") or message.get("tool_call_id")
            role, content = "user", f"Result of tool {name}: {content}" if name else f"Tool result: {content}"
        plain.append({"role": role, "content": content})
    return plain


def _with_argument_objects(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI sends a call's arguments as a JSON string; chat templates expect the object."""
    return [
        {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _arguments(c)}} for c in m["tool_calls"]]}
        if m.get("tool_calls") else m
        for m in messages
    ]


def _arguments(call: dict[str, Any]) -> Any:
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments

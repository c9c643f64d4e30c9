"""Chat templates: what turns a chat's messages into the model's prompt, chosen as llama-server chooses it.

- The model's own Jinja template (GGUF `tokenizer.chat_template`), rendered with llama-cpp-python's sandboxed
  Jinja formatter, which takes tools and a request's `chat_template_kwargs`; plain ChatML where a model has none.
- `--chat-template FILE` or a Jinja template given as text: that one instead.
- `--chat-template NAME` (chatml, llama3, mistral-v7, ...), or `--no-jinja` with the model's own template:
  llama.cpp's built-in templates (llama_chat_apply_template), which know no tools and no kwargs.

A chat whose last message is the assistant's is continued rather than answered (assistant prefill, as
llama-server and Anthropic's API do): the conversation before it is written with the start of a new assistant
turn, then the assistant's words, which the model goes on from.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from runtime.errors import LlamaboxError

# Used for chat when a model has no template of its own: plain ChatML, which most base and
# instruct models without a template handle sensibly.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_STOP = "<|im_end|>"
# What the Jinja formatter itself passes to every template; a request's chat_template_kwargs may not replace it.
RESERVED_NAMES = frozenset({
    "messages", "tools", "tool_choice", "functions", "function_call", "add_generation_prompt", "bos_token", "eos_token",
    "raise_exception", "strftime_now",
})


class ChatTemplateError(LlamaboxError):
    """The chat template rejected the messages, or could not be chosen."""


@dataclass(frozen=True)
class Rendered:
    text: str
    stop: list[str]  # stop strings the template asks for beyond the model's end tokens


class ChatTemplate(Protocol):
    source: str  # the template's text, or a built-in template's name
    takes_tools: bool  # whether it writes a `tools` list itself (otherwise callers describe tools in text)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, kwargs: dict[str, Any]) -> Rendered: ...


class JinjaTemplate:
    def __init__(self, source: str, eos: str, bos: str, stop: list[str]) -> None:
        self.source, self._stop = source, stop
        self.takes_tools = "tools" in source
        try:
            self._formatter = Jinja2ChatFormatter(template=source, eos_token=eos, bos_token=bos)
        except Exception as exc:  # jinja2's TemplateSyntaxError and friends
            raise ChatTemplateError(f"the chat template is not valid Jinja: {exc}") from None

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, kwargs: dict[str, Any]) -> Rendered:
        try:
            formatted = self._formatter(messages=messages, tools=tools or None, **kwargs)
        except Exception as exc:  # Jinja templates raise anything, by design of their authors
            raise ChatTemplateError(f"the model's chat template rejected these messages: {exc}") from None
        return Rendered(formatted.prompt, [*(formatted.stop or []), *self._stop])


class BuiltinTemplate:
    """One of llama.cpp's templates written in C++, by name or recognised from a Jinja template's text."""

    takes_tools = False

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self.render([{"role": "user", "content": "test"}], None, {})
        except ChatTemplateError:
            raise ChatTemplateError(
                f"llama.cpp has no built-in chat template {'like this model' + chr(39) + 's' if '{' in source else repr(source)}; "
                f"name one of {', '.join(builtin_names())}, or leave out --no-jinja"
            ) from None

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, kwargs: dict[str, Any]) -> Rendered:
        texts = [(str(m.get("role", "user")).encode(), str(m.get("content") or "").encode()) for m in messages]
        chat = (llama_cpp.llama_chat_message * len(texts))(*(llama_cpp.llama_chat_message(r, c) for r, c in texts))
        size = 2 * sum(len(r) + len(c) for r, c in texts) + 512
        for _ in range(2):  # the length it needs, when the first buffer is short
            buffer = ctypes.create_string_buffer(size)
            written = llama_cpp.llama_chat_apply_template(self.source.encode(), chat, len(texts), True, buffer, size)
            if written < 0:
                raise ChatTemplateError(f"llama.cpp cannot write chats with the template {self.source[:40]!r}")
            if written <= size:
                return Rendered(buffer.raw[:written].decode("utf-8", errors="replace"), [])
            size = written
        raise ChatTemplateError("llama.cpp's chat template kept growing")  # not reached: the second size is exact


def builtin_names() -> list[str]:
    count = llama_cpp.llama_chat_builtin_templates(None, 0)
    names = (ctypes.c_char_p * count)()
    llama_cpp.llama_chat_builtin_templates(names, count)
    return [name.decode() for name in names]


@dataclass(frozen=True)
class TemplateChoice:
    """--chat-template (a file, a Jinja template, or a built-in name; None: the model's own) and --jinja."""

    template: str | None = None
    jinja: bool = True


def choose(choice: TemplateChoice, model_template: str | None, eos: str, bos: str) -> ChatTemplate:
    given = choice.template
    if given is not None and given in builtin_names():
        return BuiltinTemplate(given)
    if given is not None:
        path = Path(given)
        if path.is_file():
            try:
                given = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ChatTemplateError(f"--chat-template {choice.template}: cannot read it ({exc})") from None
        elif "{{" not in given and "{%" not in given:
            raise ChatTemplateError(
                f"--chat-template {given}: neither a file, a Jinja template nor a template llama.cpp knows by name "
                f"({', '.join(builtin_names())})"
            )
    source = given or model_template
    if not choice.jinja:
        return BuiltinTemplate(source or "chatml")
    return JinjaTemplate(source or CHATML_TEMPLATE, eos, bos, [] if source else [CHATML_STOP])


def render_chat(template: ChatTemplate, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, kwargs: dict[str, Any]) -> Rendered:
    """The prompt for `messages`; a last assistant message is continued (prefill), not answered."""
    last = messages[-1] if messages else {}
    if last.get("role") == "assistant" and isinstance(last.get("content"), str) and last["content"] and not last.get("tool_calls"):
        before = template.render(messages[:-1], tools, kwargs)
        return Rendered(before.text + last["content"], before.stop)
    return template.render(messages, tools, kwargs)

"""The chat in a terminal (`--chat`): the model answers in this process, no server, no browser.

Interactive when standard input is a terminal: replies stream as they are made, Ctrl+C stops a
reply and keeps the chat, the arrow keys recall earlier messages (readline, where Python has it),
a line ending in a backslash continues on the next one and a message between two `\"\"\"` lines
may span many, and slash commands manage the chat (/help lists them). Otherwise (piped input,
`echo "question" | ./model.run --chat`) all of standard input is one message: the reply goes to
standard output and the program exits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from runtime.engine import Chunk, Prompt, PromptTooLongError, Sampling, SlotState
from runtime.errors import LlamaboxError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
BLOCK = '"""'
PROMPT, MORE = ">>> ", "... "
HELP = f"""Type a message and press Enter; the reply streams in.
  a line ending in \\   continues the message on the next line
  {BLOCK} ... {BLOCK}           a message of many lines (pasting several lines works too)
  Up and Down           earlier messages
  Ctrl+C                stop the reply (at the prompt: drop what was typed)
  Ctrl+D or /exit       leave
Commands:
  /help                 this text
  /clear                forget the conversation and start again (the system prompt stays)
  /system TEXT          use TEXT as the system prompt from now on (/system alone shows it)
  /save FILE            save the conversation: Markdown, or JSON if FILE ends in .json
                        (the browser chat imports the JSON)
  /exit                 leave (also /quit, /bye)
A message that starts with / is sent as text if it starts with //."""


class ChatEngine(Protocol):
    """What the chat needs from the engine (runtime.engine.Engine)."""

    n_ctx: int

    def chat_prompt(self, messages: list[dict[str, Any]]) -> Prompt: ...

    def stream(self, prompt: Prompt, sampling: Sampling) -> Iterator[Chunk]: ...  # closing it cancels

    def slots(self) -> tuple[list[SlotState], int]: ...


@dataclass
class Conversation:
    model: str
    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list)

    def for_model(self) -> list[dict[str, str]]:
        """The messages as the chat template gets them: the system prompt first, replies without their reasoning."""
        out = [{"role": "system", "content": self.system}] if self.system else []
        for message in self.messages:
            content = answer_of(message["content"]) if message["role"] == "assistant" else message["content"]
            if content or message["role"] != "assistant":
                out.append({"role": message["role"], "content": content})
        return out

    def as_json(self) -> str:
        """The browser chat's export format, which its Import reads back."""
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        first = next((m["content"] for m in self.messages if m["role"] == "user"), "chat")
        title = " ".join(first.split())[:60]
        return json.dumps({"format": "llamabox-chat", "version": 1, "title": title, "model": self.model, "messages": messages}, ensure_ascii=False, indent=2) + "\n"

    def as_markdown(self) -> str:
        parts = [f"# Chat with {self.model}", ""]
        if self.system:
            parts += ["## System", "", self.system, ""]
        for message in self.messages:
            parts += ["## User" if message["role"] == "user" else "## Assistant", "", message["content"], ""]
        return "\n".join(parts)


def answer_of(text: str) -> str:
    """A reply without its reasoning (`<think>…</think>`, or everything before a lone `</think>`)."""
    start = text.find(THINK_OPEN)
    if start >= 0:
        end = text.find(THINK_CLOSE, start)
        return (text[:start] + (text[end + len(THINK_CLOSE):] if end >= 0 else "")).strip()
    end = text.find(THINK_CLOSE)
    return text[end + len(THINK_CLOSE):].strip() if end >= 0 else text


class ReasoningDimmer:
    """Writes streamed text, dimming what is inside `<think>…</think>` (tags may arrive split across pieces)."""

    def __init__(self, write: Callable[[str], None], styled: bool) -> None:
        self._write, self._styled = write, styled
        self._pending, self._inside = "", False

    def feed(self, text: str) -> None:
        self._pending += text
        while self._pending:
            tag = THINK_CLOSE if self._inside else THINK_OPEN
            at = self._pending.find(tag)
            if at < 0:
                keep = _partial_suffix(self._pending, tag)
                self._emit(self._pending[: len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep :]
                return
            self._emit(self._pending[:at] + ("" if self._styled else tag))
            self._pending = self._pending[at + len(tag) :]
            self._inside = not self._inside
            if self._styled and not self._inside:
                self._write("\n")

    def finish(self) -> None:
        self._emit(self._pending)
        self._pending = ""
        if self._styled and self._inside:
            self._write("\033[0m")
        self._inside = False

    def _emit(self, text: str) -> None:
        if text:
            self._write(f"\033[2m{text}\033[0m" if self._styled and self._inside else text)


def _partial_suffix(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


@dataclass
class Reply:
    text: str
    finish_reason: str  # stop, length, cancelled, or stopped (Ctrl+C)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    context_dropped: int = 0  # tokens a context shift dropped (--context-shift)
    messages_dropped: int = 0  # the oldest messages left out of the prompt (--truncate-prompt)


class TerminalChat:
    def __init__(self, engine: ChatEngine, sampling: Sampling, model: str, out: TextIO, styled: bool) -> None:
        self.engine, self.sampling, self.out, self.styled = engine, sampling, out, styled
        self.conversation = Conversation(model=model)

    # --- one turn ---------------------------------------------------------------------------------

    def ask(self, text: str) -> Reply | None:
        """Send a user message and stream the reply; None (and the message dropped) if it cannot be sent."""
        self.conversation.messages.append({"role": "user", "content": text})
        try:
            stream = self.engine.stream(self.engine.chat_prompt(self.conversation.for_model()), self.sampling)
        except PromptTooLongError as exc:
            self.conversation.messages.pop()
            self.note(f"This conversation no longer fits in the model's context ({exc}). /clear starts again.")
            return None
        except LlamaboxError as exc:
            self.conversation.messages.pop()
            self.note(f"The model could not answer: {exc}")
            return None
        reply = self._stream(stream)
        if reply.text or reply.finish_reason != "stopped":
            self.conversation.messages.append({"role": "assistant", "content": reply.text})
        return reply

    def _stream(self, stream: Iterator[Chunk]) -> Reply:
        started, pieces, last = time.monotonic(), [], None
        dimmer = ReasoningDimmer(self._write, self.styled)
        try:
            for chunk in stream:
                pieces.append(chunk.text)
                dimmer.feed(chunk.text)
                last = chunk
        except KeyboardInterrupt:
            stream.close()  # type: ignore[attr-defined]  # cancels the generation
            dimmer.finish()
            self._wait_until_idle()
            return Reply("".join(pieces), "stopped", seconds=time.monotonic() - started)
        except LlamaboxError as exc:
            dimmer.finish()
            self.note(f"The reply broke off: {exc}")
            return Reply("".join(pieces), "error", seconds=time.monotonic() - started)
        finally:
            stream.close()  # type: ignore[attr-defined]
        dimmer.finish()
        assert last is not None
        return Reply(
            "".join(pieces), last.finish_reason or "stop", last.prompt_tokens, last.completion_tokens, time.monotonic() - started,
            last.context_dropped, last.messages_dropped,
        )

    def _wait_until_idle(self, timeout: float = 10.0) -> None:
        """Back at the prompt only once the engine has left the step it was in: the model has really
        stopped, and leaving right away cannot free the model under a running step."""
        deadline = time.monotonic() + timeout
        while any(slot.is_processing for slot in self.engine.slots()[0]) and time.monotonic() < deadline:
            time.sleep(0.02)

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def note(self, text: str) -> None:
        """A line from the chat itself (not the model), dimmed on a terminal."""
        self._write(f"\033[2m{text}\033[0m\n" if self.styled else text + "\n")

    def after_reply(self, reply: Reply) -> None:
        self._write("\n")
        if reply.finish_reason == "stopped":
            self.note("[stopped]")
            return
        used = reply.prompt_tokens + reply.completion_tokens
        speed = f", {reply.completion_tokens / reply.seconds:.1f} tokens/s" if reply.seconds > 0 else ""
        self.note(f"[{reply.completion_tokens} tokens{speed}; context {used}/{self.engine.n_ctx}]")
        if reply.messages_dropped:
            self.note(f"The chat no longer fits the context: its oldest {reply.messages_dropped} messages were left out of this reply's prompt.")
        if reply.context_dropped:
            self.note(f"The context filled up: {reply.context_dropped} older tokens were dropped to finish this reply.")
        if reply.finish_reason == "length" and self.sampling.max_tokens is None:
            self.note("The context is full: /clear starts again.")

    # --- commands ------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave."""
        name, _, argument = line.partition(" ")
        argument = argument.strip()
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name in ("/help", "/?"):
            self._write(HELP + "\n")
        elif name == "/clear":
            self.conversation.messages.clear()
            self.note("Conversation cleared.")
        elif name == "/system":
            if argument:
                self.conversation.system = argument
                self.note("System prompt set for the messages that follow.")
            else:
                self.note(f"System prompt: {self.conversation.system}" if self.conversation.system else "No system prompt of this chat (--system-prompt, if given, applies).")
        elif name == "/save":
            self.save(argument)
        else:
            self.note(f"Unknown command {name}: /help lists the commands (start with // to send a message that begins with /).")
        return True

    def save(self, argument: str) -> None:
        if not argument:
            self.note("Say where: /save FILE (Markdown, or JSON if FILE ends in .json).")
            return
        path = Path(argument).expanduser()
        text = self.conversation.as_json() if path.suffix.lower() == ".json" else self.conversation.as_markdown()
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            self.note(f"Cannot write {path}: {exc.strerror or exc}. Choose another file.")
            return
        self.note(f"Saved {len(self.conversation.messages)} messages to {path}.")


# --- reading what the user types -----------------------------------------------------------------


def _use_readline() -> Any:
    """readline gives input() line editing and history; not every Python has it (Windows)."""
    try:
        import readline
    except ImportError:
        return None
    return readline


def read_message(read_line: Callable[[str], str]) -> str:
    """One message: a line, lines joined by trailing backslashes, or a \"\"\" block. Raises EOFError at the end."""
    line = read_line(PROMPT)
    if line.lstrip().startswith(BLOCK):
        lines = [line.lstrip()[len(BLOCK):]]
        while not lines[-1].rstrip().endswith(BLOCK):
            lines.append(read_line(MORE))
        lines[-1] = lines[-1].rstrip()[: -len(BLOCK)]
        return "\n".join(lines).strip("\n")
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        lines.append(read_line(MORE))
    return "\n".join(lines)


def _remember(readline: Any, before: int, message: str) -> None:
    """History holds a message of several lines as one entry, so that Up brings all of it back."""
    if readline is None:
        return
    while readline.get_current_history_length() > before:
        readline.remove_history_item(readline.get_current_history_length() - 1)
    if message.strip():
        readline.add_history(message)


def interactive(chat: TerminalChat) -> None:
    readline = _use_readline()
    n_ctx = chat.engine.n_ctx
    chat.note(f"Chatting with {chat.conversation.model} ({n_ctx} tokens of context). /help for help, Ctrl+C stops a reply, Ctrl+D or /exit leaves.")
    while True:
        before = readline.get_current_history_length() if readline else 0
        try:
            message = read_message(input)
        except KeyboardInterrupt:
            chat._write("\n")
            chat.note("(Ctrl+D or /exit leaves)")
            continue
        except EOFError:
            chat._write("\n")
            return
        _remember(readline, before, message)
        text = message.strip()
        if not text:
            continue
        if text.startswith("/") and not text.startswith("//"):
            if not chat.command(text):
                return
            continue
        try:
            reply = chat.ask(text[1:] if text.startswith("//") else text)
        except KeyboardInterrupt:  # before the first piece could be waited for
            if chat.conversation.messages and chat.conversation.messages[-1]["role"] == "user":
                chat.conversation.messages.pop()
            chat._write("\n")
            chat.note("[stopped]")
            continue
        if reply is not None:
            chat.after_reply(reply)


def piped(chat: TerminalChat, text: str) -> None:
    if not text.strip():
        raise LlamaboxError("standard input was empty: pipe a question in, e.g. echo \"Why is the sky blue?\" | ./model.run --chat")
    reply = chat.ask(text.strip())
    if reply is None:
        raise LlamaboxError("no reply (see above)")
    chat.out.write("\n")
    chat.out.flush()


def run(engine: ChatEngine, sampling: Sampling, model: str, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> None:
    """The terminal chat with `model` (its name): interactive on a terminal, one question and answer when input is piped."""
    styled = stdout.isatty() and not os.environ.get("NO_COLOR")
    chat = TerminalChat(engine, sampling, model, stdout, styled)
    if stdin.isatty():
        interactive(chat)
    else:
        piped(chat, stdin.read())

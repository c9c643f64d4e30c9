"""A reply's reasoning told apart from its answer, as llama-server's --reasoning-format does it for OpenAI's chat
completions: what a reasoning model writes between <think> and </think> at the start of its reply goes to
`reasoning_content`, the rest to `content`. The scheduler follows the same to hold a reasoning budget.

Written here rather than taken from llama.cpp: its parser (common/chat.cpp) is C++ that llama-cpp-python does not
bind, and this is the one format llamabox's models need (DeepSeek-R1, Qwen3, SmolLM3 and their kin all use it).
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
# llama-server's names: auto and deepseek split; deepseek-legacy splits and keeps the tags in `content` too.
FORMATS = ("auto", "none", "deepseek", "deepseek-legacy")


def thinking_open(prompt_text: str) -> bool:
    """Whether the chat template opened the reasoning block itself (Qwen3 and others end the prompt with <think>),
    so that the reply starts inside it."""
    return prompt_text.rstrip().endswith(OPEN)


def split(text: str, opened: bool) -> tuple[str, str]:
    """A whole reply as (reasoning, answer)."""
    reasoning, answer = Splitter(opened).feed(text, last=True)
    return reasoning.strip(), answer


class Splitter:
    """The same for a reply that arrives in pieces: a tag may be cut between two of them, so what might be the
    start of one is held back until the next piece says."""

    def __init__(self, opened: bool) -> None:
        self._state = "thinking" if opened else "start"
        self._held = ""

    @property
    def thinking(self) -> bool:
        """Inside the reasoning block (its closing tag not seen yet)."""
        return self._state == "thinking"

    def feed(self, text: str, last: bool = False) -> tuple[str, str]:
        """(reasoning, answer) that this piece completes; with the reply's `last` piece, also what was held back."""
        reasoning, answer = self._feed(text)
        if last:
            more_reasoning, more_answer = self.finish()
            reasoning, answer = reasoning + more_reasoning, answer + more_answer
        return reasoning, answer

    def _feed(self, text: str) -> tuple[str, str]:
        self._held += text
        reasoning = answer = ""
        while True:
            if self._state == "start":  # nothing but blanks yet: a reasoning block may still open
                stripped = self._held.lstrip()
                if stripped.startswith(OPEN):
                    self._held, self._state = stripped[len(OPEN):].lstrip(), "thinking"
                elif not stripped or OPEN.startswith(stripped):
                    return reasoning, answer
                else:
                    self._state = "answer"
            elif self._state == "thinking":
                end = self._held.find(CLOSE)
                if end < 0:
                    keep = _partial_tag(self._held)
                    reasoning += self._held[: len(self._held) - keep]
                    self._held = self._held[len(self._held) - keep:]
                    return reasoning, answer
                reasoning += self._held[:end]
                self._held, self._state = self._held[end + len(CLOSE):], "after"
            elif self._state == "after":  # the blank lines between the reasoning and the answer are neither
                self._held = self._held.lstrip()
                if not self._held:
                    return reasoning, answer
                self._state = "answer"
            else:
                answer, self._held = answer + self._held, ""
                return reasoning, answer

    def finish(self) -> tuple[str, str]:
        """What was held back, once the reply has ended (a block never closed is all reasoning)."""
        held, self._held = self._held, ""
        return (held, "") if self._state == "thinking" else ("", held if self._state != "after" else "")


def _partial_tag(text: str) -> int:
    """How many of `text`'s last characters could begin </think>."""
    for n in range(min(len(CLOSE) - 1, len(text)), 0, -1):
        if CLOSE.startswith(text[-n:]):
            return n
    return 0

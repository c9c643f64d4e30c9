"""The terminal chat (--chat): its pure parts with a fake engine, then the real executable through a
pseudo-terminal (pexpect) and through a pipe."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.engine import Chunk, Prompt, PromptTooLongError, Sampling, SlotState
from runtime.terminal_chat import Conversation, ReasoningDimmer, Reply, TerminalChat, answer_of, read_message

# --- pure parts -------------------------------------------------------------------------------------


def lines(*typed: str):
    queue = list(typed)

    def read(_prompt: str) -> str:
        if not queue:
            raise EOFError
        return queue.pop(0)

    return read


def test_a_message_is_a_line_or_continued_lines_or_a_block() -> None:
    assert read_message(lines("hello")) == "hello"
    assert read_message(lines("first \\", "second \\", "third")) == "first \nsecond \nthird"
    assert read_message(lines('"""', "a", "", "b", '"""')) == "a\n\nb"
    assert read_message(lines('"""one line"""')) == "one line"
    assert read_message(lines('"""start', 'end"""')) == "start\nend"
    with pytest.raises(EOFError):
        read_message(lines('"""', "never closed"))


def test_reasoning_is_split_off_and_dimmed_even_when_tags_arrive_in_pieces() -> None:
    assert answer_of("<think>hmm</think>\n\nThe answer.") == "The answer."
    assert answer_of("pondering...</think>The answer.") == "The answer."
    assert answer_of("<think>still thinking") == ""
    assert answer_of("No reasoning here.") == "No reasoning here."
    out: list[str] = []
    dimmer = ReasoningDimmer(out.append, styled=True)
    for piece in ["<th", "ink>why", " not</t", "hink>Be", "cause."]:
        dimmer.feed(piece)
    dimmer.finish()
    assert "".join(out) == "\033[2mwhy\033[0m\033[2m not\033[0m\nBecause."
    plain: list[str] = []
    dimmer = ReasoningDimmer(plain.append, styled=False)
    for piece in ["<th", "ink>why</think>", "So."]:
        dimmer.feed(piece)
    dimmer.finish()
    assert "".join(plain) == "<think>why</think>So."


class FakeEngine:
    """Answers with fixed pieces; records the messages it was given."""

    n_ctx = 64

    def __init__(self, pieces: list[str], too_long: bool = False, dropped: int = 0) -> None:
        self.pieces, self.too_long, self.seen, self.dropped = pieces, too_long, [], dropped

    def chat_prompt(self, messages):
        self.seen.append(messages)
        if self.too_long:
            raise PromptTooLongError("the prompt is 80 tokens but the context holds 64")
        return Prompt(tokens=[1, 2, 3])

    def stream(self, prompt: Prompt, sampling: Sampling) -> Iterator[Chunk]:
        def pieces() -> Iterator[Chunk]:
            for text in self.pieces[:-1]:
                yield Chunk(text)
            yield Chunk(self.pieces[-1], "stop", prompt_tokens=3, completion_tokens=len(self.pieces), context_dropped=self.dropped)

        return pieces()

    def slots(self):
        return [SlotState(0, self.n_ctx, False, 0)], 0


def test_replies_reasoning_stays_out_of_the_history_and_save_writes_the_browser_format(tmp_path: Path) -> None:
    engine = FakeEngine(["<think>let me see</think>", "Paris", "."])
    out = io.StringIO()
    chat = TerminalChat(engine, Sampling(), "model-x", out, styled=False)
    chat.command("/system Answer briefly.")
    chat.after_reply(chat.ask("Capital of France?"))
    chat.ask("And of Italy?")
    assert engine.seen[-1] == [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]
    assert "<think>let me see</think>Paris." in out.getvalue()
    assert "[3 tokens" in out.getvalue() and "context 6/64]" in out.getvalue()
    chat.command(f"/save {tmp_path / 'chat.json'}")
    saved = json.loads((tmp_path / "chat.json").read_text())
    assert saved["format"] == "llamabox-chat" and saved["model"] == "model-x"
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    chat.command(f"/save {tmp_path / 'chat.md'}")
    assert "## Assistant" in (tmp_path / "chat.md").read_text()
    chat.command("/clear")
    assert chat.conversation.messages == [] and chat.conversation.system == "Answer briefly."
    assert chat.command("/exit") is False


def test_a_conversation_that_no_longer_fits_says_so_and_keeps_the_chat_usable() -> None:
    out = io.StringIO()
    chat = TerminalChat(FakeEngine(["x"], too_long=True), Sampling(), "m", out, styled=False)
    assert chat.ask("a very long question") is None
    assert "no longer fits" in out.getvalue() and "/clear" in out.getvalue()
    assert chat.conversation.messages == []


def test_a_reply_whose_context_was_shifted_says_how_much_was_dropped() -> None:
    out = io.StringIO()
    chat = TerminalChat(FakeEngine(["a", "b"], dropped=30), Sampling(), "m", out, styled=False)
    chat.after_reply(chat.ask("go on"))
    assert "30 older tokens were dropped to finish this reply" in out.getvalue()
    quiet = io.StringIO()
    TerminalChat(FakeEngine(["a"]), Sampling(), "m", quiet, styled=False).after_reply(Reply("a", "stop", 3, 1))
    assert "dropped" not in quiet.getvalue()


def test_saving_where_one_cannot_write_is_one_line(tmp_path: Path) -> None:
    out = io.StringIO()
    chat = TerminalChat(FakeEngine(["x"]), Sampling(), "m", out, styled=False)
    chat.command(f"/save {tmp_path / 'missing' / 'dir' / 'chat.md'}")
    assert out.getvalue().startswith("Cannot write") and out.getvalue().count("\n") == 1
    assert Conversation("m").as_markdown().startswith("# Chat with m")


# --- the real executable ------------------------------------------------------------------------------

LONG = "Write a very long story about a cat who travels around the world, with many chapters."


def _cpu_seconds(pid: int) -> float:
    """CPU time of a process and its children so far (Linux /proc)."""
    total = 0.0
    ticks = 100.0
    pids = [pid]
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="pseudo-terminal and /proc checks are Linux-only")
def test_interactive_chat_in_a_pseudo_terminal(bundle: Path, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    transcript = io.StringIO()
    child = pexpect.spawn(str(bundle), ["--chat", "--temp", "0", "-n", "400"], encoding="utf-8", timeout=180, dimensions=(40, 160))
    child.logfile_read = transcript
    try:
        child.expect("Chatting with SmolLM2")
        child.expect(">>> ")
        # A question; the reply streams, then a line of numbers.
        child.sendline("What is the capital of France?")
        child.expect(r"What is the capital of France\?\r\n")
        child.expect(r"\[(\d+) tokens, [\d.]+ tokens/s; context (\d+)/(\d+)\]")
        generated, used, n_ctx = map(int, child.match.groups())
        assert 0 < generated < used < n_ctx == 8192  # SmolLM2's own context, the default
        child.expect(">>> ")

        # Ctrl+C in the middle of a long reply stops it at once and keeps the chat.
        child.sendline(LONG)
        child.expect(r"chapters\.\r\n")
        child.expect(r"\w+ \w+ \w+ \w+ \w+")  # the reply has started
        child.sendintr()
        child.expect(r"\[stopped\]", timeout=10)
        child.expect(">>> ")
        before = _cpu_seconds(child.pid)
        time.sleep(2)
        assert _cpu_seconds(child.pid) - before < 0.5, "the model kept generating after Ctrl+C"

        # Ctrl+C at the prompt drops the line and stays; Up brings back the last message.
        child.send("half typed")
        child.expect("half typed")  # read (and echoed) before the Ctrl+C, as a person sees it; else the terminal drops it
        child.sendintr()
        child.expect("Ctrl\\+D or /exit leaves")
        child.expect(">>> ")
        child.send("\x1b[A")
        child.expect("many chapters")
        child.sendintr()
        child.expect(">>> ")

        # A message of several lines, a system prompt, saving, clearing.
        child.sendline("/system You answer in one short sentence.")
        child.expect("System prompt set")
        child.sendline('"""')
        child.sendline("Name a colour")
        child.sendline('of the sky."""')
        child.expect(r"context \d+/8192\]")
        child.expect(">>> ")
        saved = tmp_path / "chat.json"
        child.sendline(f"/save {saved}")
        child.expect("Saved 6 messages")
        child.sendline("/nonsense")
        child.expect("Unknown command /nonsense")
        child.sendline("/clear")
        child.expect("Conversation cleared")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
        print(transcript.getvalue())
    assert child.exitstatus == 0, transcript.getvalue()
    messages = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert messages[5]["content"] == "Name a colour\nof the sky."
    assert messages[2]["content"] and len(messages[4]["content"]) < 4000  # the stopped reply is kept, cut short
    assert "Traceback" not in transcript.getvalue()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="pseudo-terminals are Linux-only here")
def test_ctrl_d_leaves(bundle: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(str(bundle), ["--chat"], encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_piped_question_is_answered_on_stdout_like_p(bundle: Path) -> None:
    question = "What is the capital of France?"
    args = [str(bundle), "--temp", "0", "-n", "24"]
    piped = subprocess.run([*args, "--chat"], input=question + "\n", capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0, piped.stderr
    once = subprocess.run([*args, "-p", question], capture_output=True, text=True, timeout=300)
    assert piped.stdout.strip() and piped.stdout == once.stdout  # greedy: the same chat turn, the same words
    assert "Chatting with" not in piped.stdout and "\033[" not in piped.stdout


@pytest.mark.slow
def test_chat_refuses_p_and_empty_input(bundle: Path) -> None:
    both = subprocess.run([str(bundle), "--chat", "-p", "hi"], capture_output=True, text=True, timeout=120)
    assert both.returncode != 0 and "choose one of -p" in both.stderr and "Traceback" not in both.stderr
    empty = subprocess.run([str(bundle), "--chat"], input="", capture_output=True, text=True, timeout=300)
    assert empty.returncode != 0 and "standard input was empty" in empty.stderr and "Traceback" not in empty.stderr
    helped = subprocess.run([str(bundle), "--help"], capture_output=True, text=True, timeout=60)
    assert "--chat" in helped.stdout and "without a display" in " ".join(helped.stdout.split())

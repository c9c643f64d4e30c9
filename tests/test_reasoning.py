"""Reasoning told apart from the answer (runtime/engine/reasoning.py), whole and in pieces cut anywhere."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.devices import cpu as backends
from runtime.engine import Engine, EngineOptions, Sampling
from runtime.engine.reasoning import Splitter, split, thinking_open
from runtime.engine.templates import TemplateChoice
from runtime.model_source import ModelLocation

REPLIES = [
    # (reply, the template opened the block, reasoning, answer)
    ("<think>\nThe user greets me.\n</think>\n\nHello!", False, "The user greets me.", "Hello!"),
    ("  <think>a</think>b", False, "a", "b"),
    ("Hello! <think>not at the start</think>", False, "", "Hello! <think>not at the start</think>"),
    ("The user greets me.\n</think>\n\nHello!", True, "The user greets me.", "Hello!"),
    ("<think>never closed", False, "never closed", ""),
    ("still thinking", True, "still thinking", ""),
    ("<thin", False, "", "<thin"),
    ("", False, "", ""),
    ("Plain answer.", False, "", "Plain answer."),
]


@pytest.mark.parametrize(("reply", "opened", "reasoning", "answer"), REPLIES)
def test_a_whole_reply(reply: str, opened: bool, reasoning: str, answer: str) -> None:
    assert split(reply, opened) == (reasoning, answer)


@pytest.mark.parametrize(("reply", "opened", "reasoning", "answer"), REPLIES)
def test_the_same_reply_in_pieces_of_every_size(reply: str, opened: bool, reasoning: str, answer: str) -> None:
    for size in range(1, len(reply) + 1):
        splitter, got_reasoning, got_answer = Splitter(opened), "", ""
        for start in range(0, len(reply), size):
            r, a = splitter.feed(reply[start:start + size])
            got_reasoning, got_answer = got_reasoning + r, got_answer + a
        r, a = splitter.finish()
        assert (got_reasoning + r).strip() == reasoning and got_answer + a == answer, size


def test_a_template_that_opens_the_block_is_seen_in_the_prompt() -> None:
    assert thinking_open("<|im_start|>assistant\n<think>\n")
    assert not thinking_open("<|im_start|>assistant\n")


# --- with the real model: a template that opens a reasoning block, as Qwen3's does ----------------------------

# SmolLM2's ChatML, with the reasoning block opened at the start of the reply. SmolLM2 was not trained to close
# it, so what it writes is reasoning until a budget closes the block for it.
THINKING_CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
QUESTION = [{"role": "user", "content": "Write one sentence about cats."}]


@pytest.fixture(scope="module")
def thinking_engine(smollm2: Path) -> Iterator[Engine]:
    scores, _ = backends.variant_scores()
    backends.register_cpu_variant(backends.ranked(scores)[0].path)
    options = EngineOptions(ctx_size=512, threads=2, template=TemplateChoice(THINKING_CHATML, True))
    with Engine(ModelLocation(smollm2), options) as engine:
        yield engine


@pytest.mark.parametrize("budget", [0, 6])
def test_a_reasoning_budget_closes_the_block_and_the_model_answers(thinking_engine: Engine, budget: int) -> None:
    prompt = thinking_engine.chat_prompt(QUESTION)
    assert thinking_open(prompt.text)
    unlimited = thinking_engine.complete(prompt, Sampling(temperature=0, max_tokens=30)).text
    assert "</think>" not in unlimited  # left alone, the model never closes it: all reasoning
    text = thinking_engine.complete(prompt, Sampling(temperature=0, max_tokens=30, reasoning_budget=budget)).text
    thoughts, answer = split(text, opened=True)
    assert text.count("</think>") == 1 and answer.strip()
    # The budget's tokens of reasoning (the greedy ones the model wrote unlimited), then the block's end.
    assert len(thinking_engine.tokenize(thoughts, add_bos=False)) <= budget
    assert unlimited.startswith(text.split("</think>")[0].rstrip("\n"))


@pytest.mark.slow
def test_the_server_puts_the_reasoning_in_reasoning_content(bundle: Path, tmp_path: Path) -> None:
    import httpx

    from tests.conftest import free_port, start_server, stop_server

    template = tmp_path / "thinking.jinja"
    template.write_text(THINKING_CHATML)
    server = start_server(bundle, "--port", str(free_port()), "--temp", "0", "--chat-template", str(template), "--reasoning-budget", "6")
    try:
        chat = {"messages": QUESTION, "max_tokens": 30}
        message = httpx.post(server.url + "v1/chat/completions", json=chat, timeout=120).json()["choices"][0]["message"]
        assert message["reasoning_content"] and message["content"] and "think>" not in message["content"]
        raw = httpx.post(server.url + "v1/chat/completions", json={**chat, "reasoning_format": "none"}, timeout=120).json()
        assert "</think>" in raw["choices"][0]["message"]["content"] and "reasoning_content" not in raw["choices"][0]["message"]
        streamed = {"reasoning_content": "", "content": ""}
        with httpx.stream("POST", server.url + "v1/chat/completions", json={**chat, "stream": True}, timeout=120) as events:
            for line in events.iter_lines():
                if line.startswith("data: {"):
                    for choice in json.loads(line[6:])["choices"]:
                        for key in streamed:
                            streamed[key] += choice["delta"].get(key) or ""
        assert streamed["reasoning_content"].strip() == message["reasoning_content"] and streamed["content"] == message["content"]
        refused = httpx.post(server.url + "v1/chat/completions", json={**chat, "reasoning_format": "html"}, timeout=120)
        assert refused.status_code == 400 and "reasoning_format" in refused.json()["error"]["message"]

        # Ollama's shape: the thinking apart (message.thinking; `thinking` in /api/generate), unless think is false.
        ollama = {"model": "m", "messages": QUESTION, "stream": False, "options": {"num_predict": 30}}
        thought = httpx.post(server.url + "api/chat", json={**ollama, "think": True}, timeout=120).json()["message"]
        assert thought["thinking"] == message["reasoning_content"] and thought["content"] == message["content"]
        plain = httpx.post(server.url + "api/chat", json={**ollama, "think": False}, timeout=120).json()["message"]
        assert "thinking" not in plain and "</think>" in plain["content"]
        lines = httpx.post(server.url + "api/chat", json={**ollama, "stream": True}, timeout=120).text.splitlines()
        parts = [json.loads(line)["message"] for line in lines]
        assert "".join(m.get("thinking", "") for m in parts).strip() == thought["thinking"]
        assert "".join(m["content"] for m in parts) == thought["content"]
        generated = httpx.post(server.url + "api/generate", json={"model": "m", "prompt": QUESTION[0]["content"], "stream": False,
                                                                 "options": {"num_predict": 30}}, timeout=120).json()
        assert generated["thinking"] == thought["thinking"] and generated["response"] == thought["content"]
    finally:
        stop_server(server)

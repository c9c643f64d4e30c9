"""Chats longer than the context. Context shifting (--context-shift, as llama-server's): a reply that fills its
context drops the oldest half of what follows the first n_keep tokens and goes on. Prompt truncation
(--truncate-prompt): a chat too long for the context loses its oldest turns, never its system message. Every answer
says what was dropped."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from runtime.devices import cpu as backends
from runtime.engine import Chunk, Engine, EngineOptions, Prompt, PromptTooLongError, Sampling
from runtime.model_source import ModelLocation
from tests.conftest import Server, free_port, start_server, stop_server

STORY = "Tell me a very long story about a cat who travels the world."
CELLS = 256  # the smallest cache llama.cpp makes: what -c 128 rounds up to


@pytest.fixture(scope="module", autouse=True)
def cpu_kernels() -> None:
    scores, _ = backends.variant_scores()
    backends.register_cpu_variant(backends.ranked(scores)[0].path)


def engine(smollm2: Path, **options: object) -> Engine:
    return Engine(ModelLocation(smollm2), EngineOptions(ctx_size=128, threads=2, **options))  # type: ignore[arg-type]


def story(engine: Engine) -> Prompt:
    return engine.chat_prompt([{"role": "user", "content": STORY}])


def generate(engine: Engine, prompt: Prompt, max_tokens: int) -> list[Chunk]:
    return list(engine.stream(prompt, Sampling(temperature=0, max_tokens=max_tokens)))


def text(pieces: list[Chunk]) -> str:
    return "".join(p.text for p in pieces)


@pytest.fixture(scope="module")
def unshifted(smollm2: Path) -> list[Chunk]:
    plain = engine(smollm2, parallel=1)
    return generate(plain, story(plain), 400)


def test_without_context_shift_a_full_context_ends_the_reply(unshifted: list[Chunk]) -> None:
    last = unshifted[-1]
    assert last.finish_reason == "length" and last.context_dropped == 0
    assert last.prompt_tokens + last.completion_tokens == CELLS  # its last token needs no cell: the reply ends


@pytest.mark.parametrize("n_keep", [4, -1])
def test_a_shifted_reply_goes_on_past_the_context_and_keeps_its_first_tokens(smollm2: Path, unshifted: list[Chunk], n_keep: int) -> None:
    shifting = engine(smollm2, parallel=1, context_shift=True, n_keep=n_keep)
    prompt = story(shifting)
    pieces = generate(shifting, prompt, 400)
    last = pieces[-1]
    assert last.finish_reason == "length" and last.completion_tokens == 400  # its own limit, not the context's
    assert last.context_dropped > 0
    # Up to the first shift it is the same greedy text; only then do the answers part.
    assert text(pieces).startswith(text(unshifted))
    # What the slot holds now: the kept tokens first (n_keep and the BOS token where the model adds one, or the whole
    # prompt), then the newest; the last token sampled ended the reply and was never read.
    scheduler = shifting._scheduler
    slot = scheduler._slots[0]
    kept = len(prompt.tokens) if n_keep < 0 else n_keep + scheduler._add_bos
    assert slot.cached[:kept] == prompt.tokens[:kept]
    assert len(slot.cached) < CELLS and len(slot.cached) + last.context_dropped == last.prompt_tokens + last.completion_tokens - 1


def test_a_reply_without_a_token_limit_is_not_shifted_for_ever(smollm2: Path, unshifted: list[Chunk]) -> None:
    """As llama-server: only a reply with a limit is shifted; one without it would never have to end."""
    shifting = engine(smollm2, parallel=1, context_shift=True)
    pieces = list(shifting.stream(story(shifting), Sampling(temperature=0)))
    assert pieces[-1].finish_reason == "length" and pieces[-1].context_dropped == 0 and text(pieces) == text(unshifted)


def test_requests_filling_a_shared_cache_shift_rather_than_end(smollm2: Path) -> None:
    """Two replies in one shared cache of 256 cells: the one holding most is shifted, and both reach their limit."""
    shared = engine(smollm2, parallel=2, context_shift=True)
    prompts = [story(shared), shared.chat_prompt([{"role": "user", "content": STORY.replace("cat", "dog")}])]
    results: list[list[Chunk]] = [[], []]
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, generate(shared, prompts[i], 200))) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for pieces in results:
        assert pieces[-1].finish_reason in ("length", "stop")
        assert pieces[-1].completion_tokens == 200 or pieces[-1].finish_reason == "stop"
    assert sum(pieces[-1].context_dropped for pieces in results) > 0


@pytest.fixture(scope="module")
def shifting_server(bundle: Path) -> Iterator[Server]:
    server = start_server(bundle, "--port", str(free_port()), "--temp", "0", "-c", "128", "-np", "1", "--context-shift")
    yield server
    stop_server(server)


@pytest.mark.slow
def test_every_dialect_says_what_was_dropped(shifting_server: Server) -> None:
    url = shifting_server.url
    # The chat as SmolLM2's template (ChatML) writes it: as plain text the story ends at once.
    as_chat = f"<|im_start|>user\n{STORY}<|im_end|>\n<|im_start|>assistant\n"
    native = httpx.post(url + "completion", json={"prompt": as_chat, "n_predict": 300, "n_keep": -1}, timeout=120).json()
    assert native["tokens_predicted"] == 300 and native["truncated"] is True
    assert native["generation_settings"]["n_keep"] == -1

    chat = {"messages": [{"role": "user", "content": STORY}], "max_tokens": 300, "temperature": 0}
    openai = httpx.post(url + "v1/chat/completions", json=chat, timeout=120).json()
    assert openai["usage"]["completion_tokens"] == 300 and openai["usage"]["context_dropped_tokens"] > 0
    anthropic = httpx.post(url + "v1/messages", json={**chat, "model": "m"}, timeout=120).json()
    assert anthropic["usage"]["output_tokens"] == 300 and anthropic["usage"]["context_dropped_tokens"] > 0
    ollama = httpx.post(url + "api/chat", json={"model": "m", "messages": chat["messages"], "stream": False,
                                                "options": {"num_predict": 300, "temperature": 0}}, timeout=120).json()
    assert ollama["eval_count"] == 300 and ollama["context_dropped_tokens"] > 0
    short = httpx.post(url + "v1/chat/completions", json={**chat, "max_tokens": 8}, timeout=120).json()
    assert "context_dropped_tokens" not in short["usage"]  # nothing dropped: the shape is OpenAI's own


@pytest.mark.slow
def test_n_keep_is_read_and_checked(server: Server) -> None:
    answer = httpx.post(server.url + "completion", json={"prompt": STORY, "n_predict": 8, "n_keep": 5}, timeout=120).json()
    assert answer["truncated"] is False and answer["generation_settings"]["n_keep"] == 5
    refused = httpx.post(server.url + "completion", json={"prompt": STORY, "n_keep": -2}, timeout=120)
    assert refused.status_code == 400 and "n_keep" in refused.json()["error"]["message"]


SYSTEM = {"role": "system", "content": "You are a patient geography teacher."}


def long_chat(turns: int) -> list[dict[str, str]]:
    chat = [SYSTEM]
    for i in range(turns):
        chat += [{"role": "user", "content": f"Question {i}: name a large city in a country whose name starts with the letter {chr(65 + i)}."},
                 {"role": "assistant", "content": f"Answer {i}: there are several large cities there, and one of the best known is the capital."}]
    return [*chat, {"role": "user", "content": "Which of these cities is the largest?"}]


def test_truncating_a_long_chat_keeps_its_system_message_and_newest_turns(smollm2: Path) -> None:
    truncating = engine(smollm2, parallel=1, truncate_prompt=True)
    chat = long_chat(8)
    whole = engine(smollm2, parallel=1).chat_prompt(chat)
    assert len(whole.tokens) > CELLS  # the whole chat does not fit
    prompt = truncating.chat_prompt(chat)
    assert prompt.messages_dropped > 0 and prompt.messages_dropped % 2 == 0  # whole turns: a question and its answer
    assert len(prompt.tokens) <= CELLS * 3 // 4  # a quarter of the context left for the reply
    kept = chat[1 + prompt.messages_dropped:]
    assert prompt.text.count("Question ") == sum(m["content"].startswith("Question ") for m in kept)
    assert SYSTEM["content"] in prompt.text and "Which of these cities is the largest?" in prompt.text
    assert f"Question {prompt.messages_dropped // 2 - 1}:" not in prompt.text  # the newest dropped turn is gone
    last = generate(truncating, prompt, 16)[-1]
    assert last.messages_dropped == prompt.messages_dropped and last.completion_tokens > 0


def test_a_newest_turn_too_long_alone_is_still_refused_with_both_numbers(smollm2: Path) -> None:
    truncating = engine(smollm2, parallel=1, truncate_prompt=True)
    prompt = truncating.chat_prompt([SYSTEM, {"role": "user", "content": "cat " * 400}])
    with pytest.raises(PromptTooLongError, match=r"the prompt is \d+ tokens even with only the newest turn \(--truncate-prompt\) but the context holds 256"):
        truncating.stream(prompt, Sampling(max_tokens=4))


@pytest.mark.slow
def test_the_answer_says_how_many_messages_were_left_out(bundle: Path) -> None:
    server = start_server(bundle, "--port", str(free_port()), "--temp", "0", "-c", "128", "-np", "1", "--truncate-prompt")
    try:
        chat = {"messages": long_chat(8), "max_tokens": 8, "temperature": 0}
        openai = httpx.post(server.url + "v1/chat/completions", json=chat, timeout=120).json()
        assert openai["usage"]["prompt_messages_dropped"] > 0 and "context_dropped_tokens" not in openai["usage"]
        ollama = httpx.post(server.url + "api/chat", json={"model": "m", "messages": chat["messages"], "stream": False,
                                                          "options": {"num_predict": 8}}, timeout=120).json()
        assert ollama["prompt_messages_dropped"] == openai["usage"]["prompt_messages_dropped"]
    finally:
        stop_server(server)


@pytest.mark.slow
def test_without_truncation_a_long_chat_is_refused(shifting_server: Server) -> None:
    refused = httpx.post(shifting_server.url + "v1/chat/completions", json={"messages": long_chat(8), "max_tokens": 8}, timeout=120)
    assert refused.status_code == 400 and "tokens but the context holds 256" in refused.json()["error"]["message"]

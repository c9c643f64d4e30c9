"""The Ollama dialect through the official `ollama` client, against the bundled executable on its --ollama-port."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import httpx
import ollama
import pytest

from tests.api_samples import PERSON, WEATHER
from tests.conftest import free_port, start_server, stop_server

pytestmark = pytest.mark.slow

CATS = "Write one sentence about cats."
CAT_CHAT = [{"role": "user", "content": CATS}]
# Ollama has no tool_choice; a client that must have a call holds the answer to the call's shape with `format`
# (SmolLM2-135M rarely calls a tool on its own).
WEATHER_CALL = {
    "type": "object",
    "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER["function"]["parameters"]},
    "required": ["name", "arguments"],
}


@pytest.fixture(scope="module")
def ollama_url(bundle: Path) -> Iterator[str]:
    port = free_port()
    server = start_server(bundle, "--temp", "0", "--ctx-per-slot", "--port", str(free_port()), "--ollama-port", str(port))  # as conftest's server
    yield f"http://127.0.0.1:{port}"
    stop_server(server)


@pytest.fixture(scope="module")
def client(ollama_url: str) -> ollama.Client:
    return ollama.Client(host=ollama_url)


def _is_rfc3339(text: str) -> bool:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).tzinfo is not None


def test_generate(client: ollama.Client) -> None:
    reply = client.generate(model="llama3.2", prompt=CATS, options={"num_predict": 32})
    assert "cat" in reply.response.lower()
    assert reply.done and reply.done_reason in ("stop", "length")
    assert reply.model.endswith(":latest") and _is_rfc3339(reply.created_at)
    assert reply.prompt_eval_count > 10 and 0 < reply.eval_count <= 32
    assert reply.eval_duration > 0 and reply.prompt_eval_duration > 0
    assert reply.total_duration >= reply.eval_duration + reply.prompt_eval_duration
    assert reply.context and len(reply.context) > reply.prompt_eval_count  # the prompt's tokens and the answer's
    again = client.generate(model="another-name", prompt=CATS, options={"num_predict": 32})
    assert again.response == reply.response  # any name is the bundle's model; greedy is deterministic


def test_generate_streams_by_default_and_matches(client: ollama.Client, ollama_url: str) -> None:
    whole = client.generate(model="m", prompt=CATS, options={"num_predict": 32})
    parts = list(client.generate(model="m", prompt=CATS, options={"num_predict": 32}, stream=True))
    assert len([p for p in parts if p.response]) > 3  # really streamed, not one blob
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].eval_count == whole.eval_count and parts[-1].prompt_eval_count == whole.prompt_eval_count
    assert parts[-1].context == whole.context
    # Without "stream", Ollama streams NDJSON
    with httpx.stream("POST", ollama_url + "/api/generate", json={"model": "m", "prompt": CATS, "options": {"num_predict": 8}}) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines()]
    assert len(lines) > 2 and lines[-1]["done"] is True and lines[-1]["eval_count"] == 8


def test_num_predict_limits_eval_count(client: ollama.Client) -> None:
    reply = client.generate(model="m", prompt="Count from 1 to 100, separated by commas.", options={"num_predict": 5})
    assert reply.eval_count == 5 and reply.done_reason == "length"
    unlimited = client.generate(model="m", prompt="Say hello.", options={"num_predict": -1})
    assert unlimited.done_reason == "stop" and unlimited.eval_count > 0


def test_system_raw_and_stop(client: ollama.Client) -> None:
    stopped = client.generate(model="m", prompt=CATS, system="Answer in one sentence.", options={"num_predict": 64, "stop": ["."]})
    assert stopped.response and "." not in stopped.response and stopped.done_reason == "stop"
    templated = client.generate(model="m", prompt=CATS, options={"num_predict": 32})
    written = client.show("m").template  # SmolLM2's template, as it renders one user turn:
    assert "You are a helpful AI assistant named SmolLM, trained by Hugging Face" in written
    by_hand = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        f"<|im_start|>user\n{CATS}<|im_end|>\n<|im_start|>assistant\n"
    )
    raw = client.generate(model="m", prompt=by_hand, raw=True, options={"num_predict": 32})
    assert raw.response == templated.response and raw.prompt_eval_count == templated.prompt_eval_count
    assert raw.context is None  # Ollama returns no context in raw mode


def test_context_continues_a_conversation(client: ollama.Client) -> None:
    first = client.generate(model="m", prompt="My name is Ada.", options={"num_predict": 8})
    second = client.generate(model="m", prompt="Hello.", context=first.context, options={"num_predict": 8})
    alone = client.generate(model="m", prompt="Hello.", options={"num_predict": 8})
    assert second.prompt_eval_count == alone.prompt_eval_count + len(first.context)
    assert second.context[: len(first.context)] == first.context


def test_chat_streaming_matches_non_streaming(client: ollama.Client) -> None:
    whole = client.chat(model="m", messages=CAT_CHAT, options={"num_predict": 32})
    assert whole.message.role == "assistant" and "cat" in whole.message.content.lower()
    assert whole.done and whole.prompt_eval_count > 10 and 0 < whole.eval_count <= 32
    parts = list(client.chat(model="m", messages=CAT_CHAT, options={"num_predict": 32}, stream=True))
    assert len([p for p in parts if p.message.content]) > 3
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].done_reason == whole.done_reason and parts[-1].eval_count == whole.eval_count


def test_chat_history_and_generate_agree(client: ollama.Client) -> None:
    history = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": CATS},
    ]
    reply = client.chat(model="m", messages=history, options={"num_predict": 24})
    short = client.chat(model="m", messages=CAT_CHAT, options={"num_predict": 1})
    assert reply.message.content and reply.prompt_eval_count > short.prompt_eval_count
    chat = client.chat(model="m", messages=[{"role": "system", "content": "You are terse."}, *CAT_CHAT], options={"num_predict": 24})
    gen = client.generate(model="m", prompt=CATS, system="You are terse.", options={"num_predict": 24})
    assert chat.message.content == gen.response  # /api/generate applies the same chat template


def test_list_show_ps_version(client: ollama.Client, ollama_url: str) -> None:
    [model] = client.list().models
    assert model.model.endswith(":latest") and model.size > 50_000_000 and len(model.digest) == 64
    assert model.details.format == "gguf" and model.details.family == "llama"
    assert model.details.parameter_size == "135M" and model.details.quantization_level == "Q4_1"
    shown = client.show("whatever")
    assert shown.details.family == "llama" and "completion" in shown.capabilities
    assert shown.modelinfo["general.architecture"] == "llama" and shown.modelinfo["llama.context_length"] == 8192
    assert "<|im_start|>" in shown.template and "temperature" in shown.parameters
    [loaded] = client.ps().models
    assert loaded.model == model.model and loaded.context_length == 4096 and loaded.expires_at.year > 2100
    assert httpx.get(ollama_url + "/api/version").json()["version"].count(".") == 2
    assert httpx.head(ollama_url + "/api/version").status_code == 200
    assert client.pull("llama3.2").status == "success"  # every name is already here


def test_embed(client: ollama.Client) -> None:
    result = client.embed(model="m", input=["The cat sat on the mat.", "Stock prices fell sharply."])
    first, second = result.embeddings
    assert len(first) == len(second) == 576 and result.prompt_eval_count > 8
    assert math.isclose(sum(v * v for v in first), 1.0, rel_tol=1e-4)
    assert first != second
    single = client.embed(model="m", input="The cat sat on the mat.")
    assert single.embeddings == [first]
    assert client.embeddings(model="m", prompt="The cat sat on the mat.").embedding == first
    short = client.embed(model="m", input="The cat sat on the mat.", dimensions=64).embeddings[0]
    assert len(short) == 64 and math.isclose(sum(v * v for v in short), 1.0, rel_tol=1e-4)
    long_text = "word " * 5000
    assert client.embed(model="m", input=long_text).prompt_eval_count <= 2048  # truncated to fit, by default
    with pytest.raises(ollama.ResponseError) as refused:
        client.embed(model="m", input=long_text, truncate=False)
    assert refused.value.status_code == 400 and "tokens" in refused.value.error


def test_format_json(client: ollama.Client) -> None:
    reply = client.generate(model="m", prompt="Describe a cat as a JSON object with the keys name and color.", format="json", options={"num_predict": 100})
    assert reply.done_reason == "stop"
    assert isinstance(json.loads(reply.response), dict)


@pytest.mark.parametrize("stream", [False, True])
def test_format_schema(client: ollama.Client, stream: bool) -> None:
    messages = [{"role": "user", "content": "Invent a person with a name and an age."}]
    if stream:
        text = "".join(p.message.content for p in client.chat(model="m", messages=messages, format=PERSON, options={"num_predict": 60}, stream=True))
    else:
        text = client.chat(model="m", messages=messages, format=PERSON, options={"num_predict": 60}).message.content
    person = json.loads(text)
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and len(person["name"]) <= 24
    assert isinstance(person["age"], int) and 0 <= person["age"] <= 150


def test_tool_call(client: ollama.Client) -> None:
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    reply = client.chat(model="m", messages=messages, tools=[WEATHER], format=WEATHER_CALL, options={"num_predict": 60})
    [call] = reply.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, dict) and isinstance(call.function.arguments["city"], str)
    assert reply.message.content == "" and reply.done_reason == "stop"
    streamed = list(client.chat(model="m", messages=messages, tools=[WEATHER], format=WEATHER_CALL, options={"num_predict": 60}, stream=True))
    calls = [p.message.tool_calls for p in streamed if p.message.tool_calls]
    assert calls == [reply.message.tool_calls] and not streamed[-2].done and streamed[-1].done
    # The call and its result go back as history, as an Ollama client's agent loop sends them
    follow_up = [*messages, reply.message, {"role": "tool", "content": "Sunny, 22 degrees", "tool_name": "get_weather"}]
    answer = client.chat(model="m", messages=follow_up, tools=[WEATHER], options={"num_predict": 24})
    assert answer.prompt_eval_count > reply.prompt_eval_count


def test_logprobs(client: ollama.Client) -> None:
    reply = client.generate(model="m", prompt=CATS, logprobs=True, top_logprobs=2, options={"num_predict": 4})
    assert len(reply.logprobs) == reply.eval_count == 4
    first = reply.logprobs[0]
    assert first.logprob <= 0 and len(first.top_logprobs) == 2
    assert first.top_logprobs[0].token == first.token  # greedy: the chosen token is the likeliest
    assert "".join(lp.token for lp in reply.logprobs) == reply.response


def test_load_and_unload_requests(client: ollama.Client, ollama_url: str) -> None:
    assert client.generate(model="m").done_reason == "load"
    unloaded = httpx.post(ollama_url + "/api/chat", json={"model": "m", "messages": [], "keep_alive": 0}).json()
    assert unloaded["done"] is True and unloaded["done_reason"] == "unload"
    assert client.generate(model="m", prompt="Hi", keep_alive="10m", options={"num_predict": 2}).eval_count == 2


def test_errors_in_ollama_shape(client: ollama.Client, ollama_url: str) -> None:
    with pytest.raises(ollama.ResponseError) as bad_option:
        client.generate(model="m", prompt="Hi", options={"temperature": "hot"})
    assert bad_option.value.status_code == 400 and "temperature" in bad_option.value.error
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.chat(model="m", messages=CAT_CHAT, options={"mirostat": 2}, stream=True))
    assert streamed.value.status_code == 400 and "mirostat" in streamed.value.error
    for body in ({"prompt": "Hi"}, {"model": "m", "prompt": "Hi", "format": "xml"}, {"model": "m", "prompt": "Hi", "think": True}):
        r = httpx.post(ollama_url + "/api/generate", json=body)
        assert r.status_code == 400 and set(r.json()) == {"error"} and isinstance(r.json()["error"], str)
    r = httpx.post(ollama_url + "/api/chat", content=b'{"model": "m"', headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = httpx.post(ollama_url + "/api/generate", content=b'{"model": "m", "prompt": "Hi"}', headers={"content-type": "text/plain"})
    assert r.status_code == 415 and "Content-Type" in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as long_prompt:  # refused before the stream's first byte
        list(client.generate(model="m", prompt="word " * 9000, stream=True))
    assert long_prompt.value.status_code == 400 and "--ctx-size" in long_prompt.value.error

"""The OpenAI dialect through the official `openai` client, against the bundled executable."""

from __future__ import annotations

import json
import math

import httpx
import openai
import pytest

from tests.api_samples import PERSON, WEATHER
from tests.conftest import Server

pytestmark = pytest.mark.slow

CATS = [{"role": "user", "content": "Write one sentence about cats."}]


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "v1", api_key="not-needed", max_retries=0)


def test_chat_completion(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="any", messages=CATS, max_tokens=24, temperature=0)
    text = reply.choices[0].message.content
    assert "cat" in text.lower()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 10 and 0 < reply.usage.completion_tokens <= 24
    again = client.chat.completions.create(model="any", messages=CATS, max_tokens=24, temperature=0)
    assert again.choices[0].message.content == text


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="any", messages=CATS, max_tokens=24, temperature=0)
    stream = client.chat.completions.create(
        model="any", messages=CATS, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    pieces, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert len([p for p in pieces if p]) > 3  # really streamed, not one blob
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish in ("stop", "length")
    assert usage is not None and usage.prompt_tokens == whole.usage.prompt_tokens


def test_text_completion_streaming_and_not(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="any", prompt="The three primary colors are", max_tokens=16, temperature=0)
    text = whole.choices[0].text
    assert text.strip()
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="any", prompt="The three primary colors are", max_tokens=16, temperature=0, stream=True
    ))
    assert streamed == text


def test_a_last_assistant_message_is_continued(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "The capital of France is"}]
    reply = client.chat.completions.create(model="any", messages=messages, max_tokens=4, temperature=0).choices[0].message.content
    assert "Paris" in reply and not reply.startswith("The capital")  # the answer goes on from the prefill


def test_system_prompt_and_stop(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "system", "content": "Answer with one word."}, *CATS], max_tokens=24, temperature=0, stop=["."]
    )
    assert "." not in reply.choices[0].message.content


def test_api_errors_are_openai_shaped(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="any", messages=[], max_tokens=4)
    assert "messages" in str(info.value)
    response = httpx.post(server.url + "v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    long_prompt = "word " * 9000  # more than the 8192 tokens of SmolLM2's context, the default
    response = httpx.post(server.url + "v1/completions", json={"prompt": long_prompt, "max_tokens": 4})
    assert response.status_code == 400 and "--ctx-size" in response.json()["error"]["message"]
    for bad, param in [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4, "stream": True, "stream_options": "yes"}, "stream_options"),
        ({"max_tokens": 4, "logit_bias": {"99999999": 1}}, None),
    ]:
        response = httpx.post(server.url + "v1/chat/completions", json={"messages": CATS, **bad})
        assert response.status_code == 400, (bad, response.text)
        assert response.json()["error"]["param"] == param
    response = httpx.post(server.url + "v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "Hi"}], "top_k": Infinity}',
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]


def test_logit_bias_suppresses_end_of_text(client: openai.OpenAI) -> None:
    """Banning the end-of-text token makes generation run to max_tokens (what the benchmark relies on)."""
    eos = 2  # <|im_end|> in SmolLM2's vocabulary
    reply = client.chat.completions.create(model="any", messages=CATS, max_tokens=60, temperature=0, logit_bias={str(eos): -100})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 60


def test_usage_reports_the_reused_prompt(client: openai.OpenAI) -> None:
    history = [{"role": "user", "content": "Name three rivers."}]
    first = client.chat.completions.create(model="any", messages=history, temperature=0, max_tokens=16)
    again = client.chat.completions.create(
        model="any", messages=[*history, {"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "And one more?"}],
        temperature=0, max_tokens=8,
    )
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert first.usage.prompt_tokens_details.cached_tokens < first.usage.prompt_tokens
    assert first.usage.prompt_tokens <= cached < again.usage.prompt_tokens  # the first turn was not read again


def test_null_fields_count_as_absent(client: openai.OpenAI) -> None:
    """OpenAI clients send JSON nulls for options left unset; they mean "the server's default"."""
    with_nulls = client.chat.completions.create(
        model="any", messages=CATS, max_tokens=12,
        extra_body={"temperature": None, "top_p": None, "stop": None, "seed": None, "logit_bias": None, "n": None},
    )
    plain = client.chat.completions.create(model="any", messages=CATS, max_tokens=12)
    assert with_nulls.choices[0].message.content == plain.choices[0].message.content  # the server runs --temp 0


def test_several_choices_with_seeds(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Invent a name for a cat."}], max_tokens=12, n=3, temperature=1.5, seed=7
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # different seeds, different answers
    assert reply.usage.completion_tokens <= 36 and reply.usage.completion_tokens > 12
    again = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Invent a name for a cat."}], max_tokens=12, n=3, temperature=1.5, seed=7
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in reply.choices]


def test_streamed_choices_carry_their_index(client: openai.OpenAI) -> None:
    texts: dict[int, str] = {0: "", 1: ""}
    for chunk in client.chat.completions.create(model="any", messages=CATS, max_tokens=10, n=2, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    whole = client.chat.completions.create(model="any", messages=CATS, max_tokens=10)
    assert texts[0] == texts[1] == whole.choices[0].message.content  # greedy: both the same


def test_logprobs(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model="any", messages=CATS, max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen token is the most likely
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob
    legacy = client.completions.create(model="any", prompt="The capital of France is", max_tokens=4, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert "".join(lp.tokens) == legacy.choices[0].text and len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert lp.text_offset[0] == 0


def test_json_schema_output_parses_and_validates(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Describe a person."}], max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}},
    )
    person = json.loads(reply.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["name"], str) and 0 <= person["age"] <= 150
    anything = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "List two colours."}], max_tokens=60, response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_forced_tool_call_has_valid_arguments(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=60,
        tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    answered = client.chat.completions.create(
        model="any", max_tokens=30,
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees"},
        ],
        tools=[WEATHER], tool_choice="none",
    )
    assert answered.choices[0].message.content and answered.choices[0].finish_reason in ("stop", "length")
    question_only = client.chat.completions.create(
        model="any", max_tokens=1, messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[WEATHER], tool_choice="none",
    )
    assert answered.usage.prompt_tokens > question_only.usage.prompt_tokens + 8  # the call and its result are in the prompt
    streamed = [c for c in client.chat.completions.create(
        model="any", messages=[{"role": "user", "content": "Weather in Rome?"}], max_tokens=60, tools=[WEATHER], tool_choice="required", stream=True,
    )]
    (delta_call,) = next(c.choices[0].delta.tool_calls for c in streamed if c.choices and c.choices[0].delta.tool_calls)
    assert delta_call.function.name == "get_weather" and "city" in json.loads(delta_call.function.arguments)
    assert streamed[-1].choices[0].finish_reason == "tool_calls"


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="any", input=["A cat sleeps.", "A kitten naps.", "Stock markets fell."])
    vectors = [d.embedding for d in result.data]
    assert [d.index for d in result.data] == [0, 1, 2] and len(vectors[0]) == 576
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert math.isclose(dot(vectors[0], vectors[0]), 1, rel_tol=1e-3)
    assert dot(vectors[0], vectors[1]) > dot(vectors[0], vectors[2])
    assert result.usage.prompt_tokens > 6
    base64_default = client.embeddings.create(model="any", input="A cat sleeps.")  # the client asks for base64
    assert base64_default.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)


def test_fields_not_honoured_are_refused(server: Server) -> None:
    for bad, words in [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}}, "schema"),
        ({"tool_choice": "required"}, "tool"),
        ({"functions": [{"name": "f"}]}, "tools"),
        ({"n": 100}, "'n'"),
        ({"top_logprobs": 3}, "logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text only"),
        ({"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}}, "text only"),
        ({"web_search_options": {}}, "web"),
    ]:
        response = httpx.post(server.url + "v1/chat/completions", json={"messages": CATS, "max_tokens": 4, **bad})
        assert response.status_code == 400, (bad, response.text)
        assert words in response.json()["error"]["message"], response.text

"""The Anthropic dialect through the official `anthropic` client, against the bundled executable (greedy: --temp 0)."""

from __future__ import annotations

from typing import Any

import anthropic
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.conftest import Server

pytestmark = pytest.mark.slow

CATS = [{"role": "user", "content": "Write one sentence about cats."}]
TURNS = [
    {"role": "user", "content": "My name is Ann and I like green."},
    {"role": "assistant", "content": "Nice to meet you, Ann!"},
    {"role": "user", "content": [{"type": "text", "text": "Which colour do I like?"}]},
]


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=40)
    days: int = Field(ge=1, le=7)


WEATHER = {"name": "get_weather", "description": "The weather forecast for a city.", "input_schema": Weather.model_json_schema()}


@pytest.fixture(scope="module")
def client(server: Server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key="not-needed", max_retries=0)


@pytest.fixture(scope="module")
def chat(server: Server) -> openai.OpenAI:
    """The OpenAI dialect on the same server: the same conversation must read the same to the model."""
    return openai.OpenAI(base_url=server.url + "v1", api_key="not-needed", max_retries=0)


def counted(client: anthropic.Anthropic, **request: Any) -> int:
    return client.messages.count_tokens(model="any", **request).input_tokens


def read(usage: anthropic.types.Usage) -> int:
    """Every prompt token the answer read: Anthropic counts those found in the cache apart."""
    return usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


def test_message(client: anthropic.Anthropic) -> None:
    reply = client.messages.create(model="claude-any", max_tokens=24, messages=CATS)
    assert reply.type == "message" and reply.role == "assistant" and reply.id.startswith("msg_")
    assert reply.model == "claude-any"
    (block,) = reply.content
    assert block.type == "text" and "cat" in block.text.lower()
    assert reply.stop_reason in ("end_turn", "max_tokens") and reply.stop_sequence is None
    assert 0 < reply.usage.output_tokens <= 24
    assert read(reply.usage) == counted(client, messages=CATS)
    again = client.messages.create(model="claude-any", max_tokens=24, messages=CATS)
    assert again.content[0].text == block.text


def test_system_prompt_reads_as_a_system_message(client: anthropic.Anthropic, chat: openai.OpenAI) -> None:
    system = "You are a pirate. Answer like a pirate."
    reply = client.messages.create(model="any", max_tokens=30, system=system, messages=CATS)
    blocks = client.messages.create(model="any", max_tokens=30, system=[{"type": "text", "text": system}], messages=CATS)
    same = chat.chat.completions.create(model="any", max_tokens=30, messages=[{"role": "system", "content": system}, *CATS])
    assert reply.content[0].text == blocks.content[0].text == same.choices[0].message.content
    assert read(reply.usage) == counted(client, system=system, messages=CATS) == same.usage.prompt_tokens
    assert counted(client, system=system, messages=CATS) != counted(client, messages=CATS)  # the template's default system prompt gave way


def test_multi_turn_reads_as_the_same_chat(client: anthropic.Anthropic, chat: openai.OpenAI) -> None:
    reply = client.messages.create(model="any", max_tokens=30, messages=TURNS)
    flat = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else m["content"][0]["text"]} for m in TURNS]
    same = chat.chat.completions.create(model="any", max_tokens=30, messages=flat)
    assert reply.content[0].text == same.choices[0].message.content
    assert read(reply.usage) == counted(client, messages=TURNS) == same.usage.prompt_tokens


def test_prefill_continues_the_assistant_turn(client: anthropic.Anthropic) -> None:
    started = [*CATS, {"role": "assistant", "content": "Cats are"}]
    reply = client.messages.create(model="any", max_tokens=12, messages=started)
    assert not reply.content[0].text.startswith("Cats are")  # the reply goes on from the prefill
    assert read(reply.usage) == counted(client, messages=started) > counted(client, messages=CATS)


def test_streaming_matches_the_whole_message(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(model="any", max_tokens=24, messages=CATS)
    raw = [event.type for event in client.messages.create(model="any", max_tokens=24, messages=CATS, stream=True)]
    deltas = raw.count("content_block_delta")
    assert deltas > 3  # really streamed
    assert raw == ["message_start", "content_block_start", *["content_block_delta"] * deltas, "content_block_stop", "message_delta", "message_stop"]
    with client.messages.stream(model="any", max_tokens=24, messages=CATS) as stream:
        final = stream.get_final_message()
    with client.messages.stream(model="any", max_tokens=24, messages=CATS) as stream:
        text = "".join(stream.text_stream)
    assert text == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.id.startswith("msg_")
    assert final.usage.output_tokens == whole.usage.output_tokens and read(final.usage) == read(whole.usage)


def test_stop_sequences(client: anthropic.Anthropic) -> None:
    full = client.messages.create(model="any", max_tokens=24, messages=CATS).content[0].text
    word = full.split()[3]
    stop = " " + word
    cut = client.messages.create(model="any", max_tokens=24, messages=CATS, stop_sequences=["zzzq", stop])
    assert cut.content[0].text == full[: full.index(stop)]
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    with client.messages.stream(model="any", max_tokens=24, messages=CATS, stop_sequences=[stop]) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == cut.content[0].text and streamed.stop_sequence == stop
    missed = client.messages.create(model="any", max_tokens=5, messages=CATS, stop_sequences=["zzzq"])
    assert missed.stop_reason == "max_tokens" and missed.stop_sequence is None


def test_forced_tool_call_validates_and_its_result_is_read(client: anthropic.Anthropic) -> None:
    question = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]
    reply = client.messages.create(
        model="any", max_tokens=60, messages=question, tools=[WEATHER], tool_choice={"type": "tool", "name": "get_weather"}
    )
    assert reply.stop_reason == "tool_use"
    (call,) = reply.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.id.startswith("toolu_")
    Weather.model_validate(call.input)  # the input holds to the input_schema
    history = [
        *question,
        {"role": "assistant", "content": [block.model_dump() for block in reply.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 degrees"}]},
    ]
    answered = client.messages.create(model="any", max_tokens=30, messages=history, tools=[WEATHER], tool_choice={"type": "none"})
    assert answered.stop_reason in ("end_turn", "max_tokens") and answered.content[0].text
    assert read(answered.usage) > counted(client, messages=question) + 8  # the call and its result are in the prompt
    with client.messages.stream(model="any", max_tokens=60, messages=question, tools=[WEATHER], tool_choice={"type": "any"}) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in events and final.stop_reason == "tool_use"
    Weather.model_validate(final.content[0].input)


def test_count_tokens(client: anthropic.Anthropic) -> None:
    plain = counted(client, messages=CATS)
    assert plain > 5
    assert counted(client, messages=CATS, tools=[WEATHER]) > plain + 10  # the tools are described in the prompt
    assert counted(client, messages=TURNS) > plain


def test_errors_are_anthropic_shaped(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as missing:
        client.post("/v1/messages", body={"model": "any", "messages": CATS}, cast_to=anthropic.types.Message)
    assert missing.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": "'max_tokens' is required"}}
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    with pytest.raises(anthropic.BadRequestError, match="reads text only"):
        client.messages.create(model="any", max_tokens=5, messages=[{"role": "user", "content": [image]}])
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        client.messages.create(model="any", max_tokens=5, messages=CATS, extra_body={"temperature": 1.5})
    with pytest.raises(anthropic.BadRequestError, match="not among the tools"):
        client.messages.create(model="any", max_tokens=5, messages=CATS, tools=[WEATHER], tool_choice={"type": "tool", "name": "nope"})
    with pytest.raises(anthropic.BadRequestError, match="thinking"):
        client.messages.create(model="any", max_tokens=5, messages=CATS, thinking={"type": "enabled", "budget_tokens": 1024})

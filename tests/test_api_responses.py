"""The OpenAI Responses dialect through `client.responses` of the official `openai` client, against the
bundled executable (greedy: --temp 0)."""

from __future__ import annotations

import json

import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from tests.conftest import Server

pytestmark = pytest.mark.slow

CATS = "Write one sentence about cats."
TURNS = [
    {"role": "user", "content": "My name is Ann and I like green."},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Nice to meet you, Ann!", "annotations": []}]},
    {"role": "user", "content": [{"type": "input_text", "text": "Which colour do I like?"}]},
]


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(max_length=24)
    age: int = Field(ge=0, le=150)


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid")
    city: str = Field(max_length=40)


WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.", "parameters": Weather.model_json_schema(), "strict": True}


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "v1", api_key="not-needed", max_retries=0)


def test_plain_text(client: openai.OpenAI) -> None:
    reply = client.responses.create(model="any", input=CATS, max_output_tokens=40)
    assert reply.object == "response" and reply.id.startswith("resp_") and reply.status == "completed"
    (message,) = reply.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert "cat" in reply.output_text.lower()
    assert reply.usage.input_tokens > 10 and 0 < reply.usage.output_tokens < 40
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens
    assert reply.max_output_tokens == 40 and reply.temperature == 0 and reply.store is False
    assert client.responses.create(model="any", input=CATS, max_output_tokens=40).output_text == reply.output_text


def test_instructions_and_message_lists_read_as_the_same_chat(client: openai.OpenAI) -> None:
    system = "You are a pirate. Answer like a pirate."
    reply = client.responses.create(model="any", instructions=system, input=CATS, max_output_tokens=30)
    same = client.chat.completions.create(model="any", max_tokens=30, messages=[{"role": "system", "content": system}, {"role": "user", "content": CATS}])
    assert reply.output_text == same.choices[0].message.content and reply.instructions == system
    assert reply.usage.input_tokens == same.usage.prompt_tokens
    turns = client.responses.create(model="any", input=TURNS, max_output_tokens=30)
    flat = [{"role": "user", "content": "My name is Ann and I like green."}, {"role": "assistant", "content": "Nice to meet you, Ann!"}, {"role": "user", "content": "Which colour do I like?"}]
    same = client.chat.completions.create(model="any", max_tokens=30, messages=flat)
    assert turns.output_text == same.choices[0].message.content
    assert turns.usage.input_tokens == same.usage.prompt_tokens


def test_streaming_events_in_order(client: openai.OpenAI) -> None:
    whole = client.responses.create(model="any", input=CATS, max_output_tokens=40)
    events = list(client.responses.create(model="any", input=CATS, max_output_tokens=40, stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    assert deltas > 3  # really streamed
    assert kinds == [
        "response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done", "response.content_part.done", "response.output_item.done", "response.completed",
    ]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    completed = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == completed.output_text == events[-4].text == whole.output_text
    assert completed.id == events[0].response.id and completed.usage.output_tokens == whole.usage.output_tokens
    with client.responses.stream(model="any", input=CATS, max_output_tokens=40) as stream:
        helper_text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert helper_text == final.output_text == whole.output_text


def test_max_output_tokens_makes_it_incomplete(client: openai.OpenAI) -> None:
    reply = client.responses.create(model="any", input=CATS, max_output_tokens=5)
    assert reply.status == "incomplete" and reply.incomplete_details.reason == "max_output_tokens"
    assert reply.output[0].status == "incomplete" and reply.output_text and reply.usage.output_tokens == 5
    events = list(client.responses.create(model="any", input=CATS, max_output_tokens=5, stream=True))
    assert events[-1].type == "response.incomplete" and events[-1].response.incomplete_details.reason == "max_output_tokens"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == reply.output_text


def test_forced_function_call(client: openai.OpenAI) -> None:
    question = {"role": "user", "content": "What is the weather in Paris?"}
    reply = client.responses.create(model="any", input=[question], tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}, max_output_tokens=60)
    assert reply.status == "completed" and reply.output_text == ""
    (call,) = reply.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    Weather.model_validate_json(call.arguments)  # the arguments hold to the parameters' schema
    history = [question, *[item.model_dump(exclude_none=True) for item in reply.output], {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 24 degrees"}]
    answered = client.responses.create(model="any", input=history, tools=[WEATHER], tool_choice="none", max_output_tokens=30)
    assert answered.output[0].type == "message" and answered.output_text
    plain = client.responses.create(model="any", input=[question], max_output_tokens=1)
    assert answered.usage.input_tokens > plain.usage.input_tokens + 8  # the call and its result are in the prompt
    with client.responses.stream(model="any", input=[question], tools=[WEATHER], tool_choice="required", max_output_tokens=60) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    assert final.output[0].parsed_arguments == Weather.model_validate_json(final.output[0].arguments).model_dump()


def test_json_schema_format_parses_and_validates(client: openai.OpenAI) -> None:
    schema = Person.model_json_schema()
    reply = client.responses.create(
        model="any", input="Describe a person.", max_output_tokens=80,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
    )
    Person.model_validate(json.loads(reply.output_text))
    assert reply.text.format.type == "json_schema"
    parsed = client.responses.parse(model="any", input="Describe a person.", max_output_tokens=80, text_format=Person)
    assert isinstance(parsed.output_parsed, Person)
    anything = client.responses.create(model="any", input="List two colours.", max_output_tokens=60, text={"format": {"type": "json_object"}})
    assert isinstance(json.loads(anything.output_text), dict)


def test_stateless(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="any", input="And then?", previous_response_id="resp_123")
    assert refused.value.param == "previous_response_id" and "send the whole conversation" in refused.value.message
    with pytest.raises(openai.NotFoundError, match="keeps no responses"):
        client.responses.retrieve("resp_123")
    kept = client.responses.create(model="any", input=CATS, max_output_tokens=3, store=True)  # accepted; nothing is kept
    assert kept.store is False


def test_errors_are_openai_shaped(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="reads text only"):
        client.responses.create(model="any", input=[{"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/a.png", "detail": "auto"}]}])
    with pytest.raises(openai.BadRequestError, match="only function tools"):
        client.responses.create(model="any", input=CATS, tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="max_output_tokens"):
        client.responses.create(model="any", input=CATS, max_output_tokens=0)
    with pytest.raises(openai.BadRequestError) as missing:
        client.responses.create(model="any")
    assert missing.value.param == "input" and missing.value.type == "invalid_request_error"

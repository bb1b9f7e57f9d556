"""The chat/completions contract that agents and frameworks rely on, driven by the official openai
client and by langchain-openai against a live `edgelm serve`: tools (auto, required, named;
streaming and not), a whole tool loop, response_format, usage in streams, logprobs, n."""

from __future__ import annotations

import json

import jsonschema
import pytest

from tests.runtime.test_server import openai_client, serving

openai = pytest.importorskip("openai")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "unit"]}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                                    "b": {"type": "integer", "minimum": -999, "maximum": 999}},
                   "required": ["a", "b"]}}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]
ANSWER = {"type": "object", "additionalProperties": False, "required": ["city", "temperature", "tags"],
          "properties": {"city": {"type": "string", "maxLength": 16}, "temperature": {"type": "number"},
                         "tags": {"type": "array", "items": {"enum": ["sun", "rain", "wind"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def server(tiny_long_bundle):
    with serving(tiny_long_bundle) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def _valid_call(call, tools=(WEATHER, ADD)):
    declared = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert call.type == "function" and call.id and call.function.name in declared
    jsonschema.validate(json.loads(call.function.arguments), declared[call.function.name])


def test_tool_choice_required_always_returns_valid_calls(client):
    for seed in range(6):
        reply = client.chat.completions.create(model="tiny-long", messages=ASK, tools=[WEATHER, ADD],
                                               tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                                               seed=seed, max_tokens=200)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        assert len(choice.message.tool_calls) == 1 and choice.message.content is None
        _valid_call(choice.message.tool_calls[0])
    # parallel calls (the default): every complete call is valid; a call cut by max_tokens is not returned
    reply = client.chat.completions.create(model="tiny-long", messages=ASK, tools=[WEATHER, ADD],
                                           tool_choice="required", temperature=1.0, seed=0, max_tokens=120)
    assert reply.choices[0].finish_reason in ("tool_calls", "length") and reply.choices[0].message.tool_calls
    for call in reply.choices[0].message.tool_calls:
        _valid_call(call)


def test_a_named_function_streams_as_tool_call_deltas(client):
    chunks = list(client.chat.completions.create(
        model="tiny-long", messages=ASK, tools=[WEATHER, ADD], stream=True, temperature=1.0, seed=1,
        tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=160,
        stream_options={"include_usage": True}))
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas and all(d.index == 0 for d in deltas)  # parallel calls off for a named function
    name = "".join(d.function.name or "" for d in deltas)
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert name == "add"
    jsonschema.validate(json.loads(arguments), ADD["function"]["parameters"])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_a_whole_tool_loop_with_results_sent_back(client):
    first = client.chat.completions.create(model="tiny-long", messages=ASK, tools=[WEATHER],
                                           tool_choice="required", max_tokens=120)
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, {"role": "assistant", "content": None,
                      "tool_calls": [{"id": call.id, "type": "function",
                                      "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 4, "sky": "rain"})}]
    second = client.chat.completions.create(model="tiny-long", messages=history, tools=[WEATHER], max_tokens=8)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result are in the prompt


def test_tool_choice_none_and_auto_answer_in_text(client):
    for choice in ("none", "auto"):
        reply = client.chat.completions.create(model="tiny-long", messages=ASK, tools=[WEATHER], tool_choice=choice,
                                               max_tokens=6)
        # the tiny random model does not write a call: a text reply, no invented tool_calls
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason != "tool_calls"
        chunks = list(client.chat.completions.create(model="tiny-long", messages=ASK, tools=[WEATHER],
                                                     tool_choice=choice, max_tokens=6, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
        assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)


def test_response_format_json_schema_validates_at_any_seed(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": ANSWER, "strict": True}}
    for seed in range(8):
        reply = client.chat.completions.create(model="tiny-long", messages=ASK, response_format=fmt,
                                               temperature=1.0, seed=seed, max_tokens=200)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), ANSWER)
    finished = 0
    for seed in range(4):  # any object: the tiny model may write one past max_tokens, so only finished ones parse
        plain = client.chat.completions.create(model="tiny-long", messages=ASK, response_format={"type": "json_object"},
                                               temperature=1.0, seed=seed, max_tokens=300)
        if plain.choices[0].finish_reason == "stop":
            finished += 1
            assert isinstance(json.loads(plain.choices[0].message.content), dict)
        else:
            assert plain.choices[0].finish_reason == "length"
    assert finished >= 2


def test_logprobs_describe_the_generated_tokens(client):
    reply = client.chat.completions.create(model="tiny-long", messages=ASK, max_tokens=5, logprobs=True,
                                           top_logprobs=3)
    entries = reply.choices[0].logprobs.content
    assert len(entries) == reply.usage.completion_tokens
    assert "".join(e.token for e in entries) == reply.choices[0].message.content
    for entry in entries:  # greedy: the chosen token is the most likely one
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True) and entry.logprob == pytest.approx(tops[0])
    text = client.completions.create(model="tiny-long", prompt="Once upon", max_tokens=4, logprobs=2)
    lp = text.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == text.usage.completion_tokens
    assert all(len(alternatives) == 2 for alternatives in lp.top_logprobs) and all(v <= 0 for v in lp.token_logprobs)


def test_n_choices_each_get_their_own_sample(client):
    reply = client.chat.completions.create(model="tiny-long", messages=ASK, n=3, temperature=1.0, seed=5, max_tokens=8,
                                           logprobs=True)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1  # seeds 5, 6, 7
    first = client.chat.completions.create(model="tiny-long", messages=ASK, temperature=1.0, seed=6, max_tokens=8)
    assert first.choices[0].message.content == reply.choices[1].message.content
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)  # all choices counted
    streamed = list(client.chat.completions.create(model="tiny-long", messages=ASK, n=2, temperature=1.0, seed=5,
                                                   max_tokens=8, stream=True))
    texts = {0: "", 1: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert [texts[0], texts[1]] == [c.message.content for c in reply.choices[:2]]


def test_content_parts_and_penalties_are_honoured(client):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the weather "}, {"type": "text", "text": "in Oslo?"}]}]
    same = [client.chat.completions.create(model="tiny-long", messages=m, max_tokens=8).choices[0].message.content
            for m in (parts, ASK)]
    assert same[0] == same[1]
    plain = client.chat.completions.create(model="tiny-long", messages=ASK, max_tokens=24).choices[0].message.content
    penalised = client.chat.completions.create(model="tiny-long", messages=ASK, max_tokens=24,
                                               frequency_penalty=2.0, presence_penalty=2.0).choices[0].message.content
    assert penalised != plain


def test_langchain_bind_tools_and_structured_output(server):
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    chat = langchain_openai.ChatOpenAI(base_url=server + "/v1", api_key="unused", model="tiny-long", max_retries=0,
                                       max_tokens=160, temperature=0)

    def get_weather(city: str, unit: str) -> str:
        """The weather in a city, in unit "c" or "f"."""
        return "cold"

    message = chat.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Oslo?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    assert set(message.tool_calls[0]["args"]) >= {"city", "unit"}

    class Forecast(BaseModel):
        city: str = Field(max_length=16)
        rain: bool

    forecast = chat.with_structured_output(Forecast, method="json_schema").invoke("Forecast for Oslo?")
    assert isinstance(forecast, Forecast)

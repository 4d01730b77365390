"""The OpenAI API with the official ``openai`` SDK (strict response validation on) against a live
server (gunicorn + gevent) on the real embedded model, tokens required: what every client in
the ecosystem sees."""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
import requests

from tests.live_server import LiveServer, wait_until_idle

TOKEN = "sdk-test-token-0123456789"
MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]
ANSWER_SCHEMA = {"type": "object",
                 "properties": {"city": {"enum": ["Paris", "London", "Rome"]},
                                "population_millions": {"type": "integer"}},
                 "required": ["city", "population_millions"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai-sdk")
    (folder / "apiTokens.txt").write_text(f"sdk:{TOKEN}\n")
    live = LiveServer(folder)
    live.start(isApiTokensRequired=True, parallelSlots=2, modelAliases=["gpt-4o-mini"])
    yield live
    live.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0,
                         timeout=120, _strict_response_validation=True)


def ask(client, **params):
    params = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 32, **params}
    return client.chat.completions.create(**params)


# -- models ----------------------------------------------------------------------------------

def test_models_list_and_retrieve(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"


# -- chat ------------------------------------------------------------------------------------

def test_chat_answers_with_usage(client):
    reply = ask(client)
    assert "4" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.model == MODEL and reply.system_fingerprint.startswith("fp_")
    usage = reply.usage
    assert usage.prompt_tokens > 5 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_text_equals_the_whole_reply_at_temperature_0(client):
    whole = ask(client, max_tokens=48).choices[0].message.content
    chunks = list(ask(client, max_tokens=48, stream=True,
                      stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_max_tokens_ends_with_length(client):
    reply = ask(client, max_tokens=3, messages=[
        {"role": "user", "content": "Write a long story about a dragon."}])
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 3


def test_a_stop_string_ends_the_reply_before_it(client):
    free = ask(client).choices[0].message.content
    word = free.split()[2]
    reply = ask(client, stop=[word])
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == free[:free.index(word)]


def test_the_same_seed_gives_the_same_sampled_reply(client):
    params = {"temperature": 1.0, "max_tokens": 24,
              "messages": [{"role": "user", "content": "Tell me a random fact."}]}
    first = ask(client, seed=1234, **params).choices[0].message.content
    assert ask(client, seed=1234, **params).choices[0].message.content == first


def test_logprobs_come_with_each_token(client):
    reply = ask(client, logprobs=True, top_logprobs=3, max_tokens=8)
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)


def test_json_mode_replies_with_json(client):
    reply = ask(client, max_tokens=400, response_format={"type": "json_object"}, messages=[
        {"role": "user", "content": 'Answer with a JSON object {"answer": ...}: what is 2 + 2?'}])
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_a_json_schema_is_followed(client):
    reply = ask(client, max_tokens=100, response_format={
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA, "strict": True}})
    answer = json.loads(reply.choices[0].message.content)
    assert set(answer) == {"city", "population_millions"}
    assert answer["city"] in ("Paris", "London", "Rome")
    assert isinstance(answer["population_millions"], int)


def test_the_repeated_history_is_read_from_the_cache(client):
    history = [{"role": "user", "content": "Name three colours."}]
    first = ask(client, messages=history)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And three animals?"}]
    second = ask(client, messages=history)
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


# -- completions and embeddings --------------------------------------------------------------

def test_completions_continue_a_raw_prompt(client, server):
    params = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8,
              "temperature": 0}
    reply = client.completions.create(**params)
    # Streamed completions chunks carry "finish_reason": null until the last, as OpenAI's own
    # do; the SDK's type for them says never null, so its strict validation cannot read them.
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0)
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        **params, stream=True) if c.choices)
    assert streamed == reply.choices[0].text


def test_embeddings_as_floats_and_base64(client):
    texts = ["The cat sat on the mat.", "A cat was sitting on a mat.",
             "Quarterly revenue rose by four percent."]
    # The SDK asks for base64 by default and decodes it after validating: strict validation
    # needs floats asked for (base64 is checked below, on the wire).
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    vectors = np.array([item.embedding for item in floats.data])
    assert vectors.shape[0] == 3 and floats.usage.prompt_tokens > 0
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > similarity[0, 2]
    raw = requests.post(client.base_url.__str__() + "embeddings", timeout=60,
                        headers={"Authorization": f"Bearer {TOKEN}"},
                        json={"input": texts[0], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-6)


# -- errors raise the SDK's typed exceptions -------------------------------------------------

def test_a_wrong_key_raises_authentication_error(server):
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_an_unknown_model_raises_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        ask(client, model="llama-3-70b")
    assert caught.value.code == "model_not_found" and MODEL in caught.value.message


def test_an_invalid_parameter_raises_bad_request_naming_it(client):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, temperature=5)
    assert caught.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, n=3)
    assert caught.value.param == "n"


def test_a_prompt_past_the_context_raises_bad_request(client):
    long = [{"role": "user", "content": "word " * 6000}]
    with pytest.raises(openai.BadRequestError) as caught:
        ask(client, messages=long, stream=True)
    assert caught.value.code == "context_length_exceeded"


# -- cancel ----------------------------------------------------------------------------------

def test_closing_a_stream_frees_its_slot(client, server):
    stream = ask(client, max_tokens=2000, stream=True, messages=[
        {"role": "user", "content": "Write a very long story about the sea."}])
    next(iter(stream))
    assert server.health()["busy"] == 1
    stream.close()
    wait_until_idle(server)


def test_a_client_that_gives_up_waiting_frees_its_slot(server):
    impatient = openai.OpenAI(base_url=server.url + "/v1", api_key=TOKEN, max_retries=0,
                              timeout=1.5)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model=MODEL, max_tokens=2000, messages=[
            {"role": "user", "content": "Write a very long story about the sea."}])
    wait_until_idle(server)


# -- one framework of the ecosystem ----------------------------------------------------------

def test_langchain_chat_model_talks_to_tanglebox(server, monkeypatch):
    monkeypatch.setenv("LANGSMITH_TRACING", "false")
    from langchain_openai import ChatOpenAI
    chat = ChatOpenAI(base_url=server.url + "/v1", api_key=TOKEN, model="gpt-4o-mini",
                      temperature=0, max_tokens=32, max_retries=0)
    message = chat.invoke("What is 2 + 2?")
    assert "4" in message.content
    assert message.usage_metadata["output_tokens"] > 0
    assert "".join(chunk.content for chunk in chat.stream("What is 2 + 2?")) == message.content

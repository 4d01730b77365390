"""The OpenAI API's contract on the fake backend, through Flask's test client: shapes, streams,
every door (enableApi, origin, token, state, body, parameters, model) and its error shape.

The live server with the real model and the official SDK is tests/integration/test_openai_sdk.py.
"""

from __future__ import annotations

import json

import pytest

from tanglebox.chat_request import ChatRequest
from tanglebox.prompting import USER, Message
from tanglebox.settings import load_settings
from tests.conftest import write_settings
from tests.fake_backend import FakeBackend
from tests.live_server import wait_until

CHAT = "/v1/chat/completions"
MODEL = "fake-model.gguf"


def chat_body(text: str = "echo Hello there", **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def sse_events(response) -> list:
    """The ``data:`` payloads of an SSE body: dicts, and the string "[DONE]"."""
    events = []
    for block in response.get_data(as_text=True).split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_openai_error(response, status: int, param=None, code=None) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def served(**values) -> dict:
    """Settings for ``app``: the fake model under a file name, an alias, greedy."""
    return {"modelName": "models/fake-model.gguf", "modelAliases": ["gpt-4o-mini"],
            "temperature": 0, **values}


@pytest.fixture
def settings_values():
    return served()


# -- models ----------------------------------------------------------------------------------

def test_models_lists_the_served_model(client):
    body = client.get("/v1/models").get_json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    model = body["data"][0]
    assert model["object"] == "model" and model["owned_by"] and isinstance(model["created"], int)


def test_a_model_is_found_by_its_id_and_its_aliases(client):
    assert client.get("/v1/models/fake-model.gguf").get_json()["id"] == "fake-model.gguf"
    assert client.get("/v1/models/gpt-4o-mini").get_json()["id"] == "gpt-4o-mini"


def test_an_unknown_model_is_404_model_not_found_listing_the_ids(client):
    error = assert_openai_error(client.get("/v1/models/llama-70b"), 404, "model",
                                "model_not_found")
    assert "fake-model.gguf" in error["message"] and "gpt-4o-mini" in error["message"]
    response = client.post(CHAT, json=chat_body(model="llama-70b"))
    assert_openai_error(response, 404, "model", "model_not_found")


# -- chat completions ------------------------------------------------------------------------

def test_chat_completion_has_openai_shape(client):
    response = client.post(CHAT, json=chat_body(model="fake-model.gguf"))
    assert response.status_code == 200
    body = response.get_json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model.gguf"
    assert isinstance(body["created"], int) and body["system_fingerprint"].startswith("fp_")
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello there", "refusal": None}
    assert choice["finish_reason"] == "stop" and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["completion_tokens"] == len("Hello there")
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def test_an_alias_is_answered_with_the_served_id(client):
    body = client.post(CHAT, json=chat_body(model="gpt-4o-mini")).get_json()
    assert body["model"] == "fake-model.gguf"


def test_a_request_without_model_gets_the_default_model(client):
    body = chat_body()
    del body["model"]
    assert client.post(CHAT, json=body).get_json()["model"] == "fake-model.gguf"


def test_text_parts_system_and_history_reach_the_model(client, fake_backend):
    body = {"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "echo first"},
        {"role": "assistant", "content": "first"},
        {"role": "user", "content": [{"type": "text", "text": "echo two"},
                                     {"type": "text", "text": "parts"}]}]}
    reply = client.post(CHAT, json=body).get_json()
    assert reply["choices"][0]["message"]["content"] == "two\nparts"
    prompt = bytes(t for t in fake_backend.sequences[0] if t < 256).decode()
    assert prompt.startswith("Be brief.echo firstfirst")


def test_streamed_chat_sends_role_text_finish_and_done(client):
    response = client.post(CHAT, json=chat_body(stream=True))
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "Hello there"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)


def test_streamed_text_equals_the_whole_reply(client):
    whole = client.post(CHAT, json=chat_body("count 30")).get_json()
    events = sse_events(client.post(CHAT, json=chat_body("count 30", stream=True)))
    streamed = "".join(e["choices"][0]["delta"].get("content", "")
                       for e in events if e != "[DONE]")
    assert streamed == whole["choices"][0]["message"]["content"]


def test_include_usage_adds_a_last_chunk_with_usage_and_no_choices(client):
    body = chat_body(stream=True, stream_options={"include_usage": True})
    chunks = sse_events(client.post(CHAT, json=body))[:-1]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == len("Hello there")
    assert all(c["usage"] is None for c in chunks[:-1])


def test_max_tokens_and_max_completion_tokens_end_with_length(client):
    for param in ("max_tokens", "max_completion_tokens"):
        body = client.post(CHAT, json=chat_body(**{param: 3})).get_json()
        assert body["choices"][0]["message"]["content"] == "Hel"
        assert body["choices"][0]["finish_reason"] == "length"


def test_stop_strings_end_the_reply(client):
    for stop in (" ", [" the", "xyz"]):
        body = client.post(CHAT, json=chat_body(stop=stop)).get_json()
        assert body["choices"][0]["message"]["content"] == "Hello"
        assert body["choices"][0]["finish_reason"] == "stop"


def test_repeating_the_history_reuses_the_cached_prefix(client):
    first = [{"role": "user", "content": "echo one"}]
    client.post(CHAT, json={"messages": first})
    again = first + [{"role": "assistant", "content": "one"},
                     {"role": "user", "content": "echo two"}]
    usage = client.post(CHAT, json={"messages": again}).get_json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > len("echo one")


# -- completions -----------------------------------------------------------------------------

def test_completion_reads_the_raw_prompt(client):
    prompt = "<|user|>echo raw<|end|><|assistant|>"
    body = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    body = body.get_json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"] == "raw" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["prompt_tokens"] == len(b"echo raw") + 3


def test_a_raw_prompt_without_turn_markers_is_answered_not_a_5xx(client):
    # Found by the fuzz test: the fake model once failed on a prompt it could not read.
    response = client.post("/v1/completions", json={"prompt": "echo hi"})
    assert response.status_code == 200
    assert response.get_json()["choices"][0]["finish_reason"] == "stop"


def test_streamed_completion_chunks_and_done(client):
    prompt = "<|user|>echo raw text<|end|><|assistant|>"
    events = sse_events(client.post("/v1/completions", json={"prompt": prompt, "stream": True}))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == "raw text"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("field, value", [("echo", True), ("best_of", 2), ("suffix", "end"),
                                          ("prompt", [[1, 2, 3]]), ("prompt", ["a", "b"]),
                                          ("prompt", ""), ("logprobs", 6)])
def test_completion_refuses_what_it_cannot_honour(client, field, value):
    body = {"prompt": "hi", field: value}
    assert_openai_error(client.post("/v1/completions", json=body), 400, field)


# -- validation: a 400 naming the parameter --------------------------------------------------

@pytest.mark.parametrize("field, value, param", [
    ("messages", [], "messages"),
    ("messages", [{"role": "robot", "content": "hi"}], "messages[0].role"),
    ("messages", [{"role": [], "content": "hi"}], "messages[0].role"),
    ("messages", [{"role": "tool", "content": "hi"}], "messages[0].role"),
    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
     "messages[0].content[0].type"),
    ("messages", [{"role": "user", "content": None}], "messages[0].content"),
    ("messages", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
     "messages"),
    ("temperature", 2.5, "temperature"),
    ("temperature", "0.5", "temperature"),
    ("top_p", 1.5, "top_p"),
    ("max_tokens", 0, "max_tokens"),
    ("max_tokens", 10 ** 9, "max_tokens"),
    ("max_completion_tokens", 1.5, "max_completion_tokens"),
    ("n", 2, "n"),
    ("seed", 1.5, "seed"),
    ("stop", ["a", 1], "stop"),
    ("stop", ["x"] * 17, "stop"),
    ("presence_penalty", 3, "presence_penalty"),
    ("frequency_penalty", -2.5, "frequency_penalty"),
    ("logit_bias", {"abc": 1}, "logit_bias"),
    ("logit_bias", {"10": 101}, "logit_bias.10"),
    ("top_logprobs", 3, "top_logprobs"),
    ("stream", "yes", "stream"),
    ("stream_options", {"include_usage": "yes"}, "stream_options.include_usage"),
    ("tool_choice", "required", "tool_choice"),
    ("response_format", {"type": "xml"}, "response_format.type"),
    ("model", 7, "model"),
])
def test_invalid_parameters_are_400_naming_them(client, field, value, param):
    error = assert_openai_error(client.post(CHAT, json=chat_body(**{field: value})), 400, param)
    assert error["type"] == "invalid_request_error"


def test_json_output_on_a_backend_without_grammars_is_a_clear_400(client):
    body = chat_body(response_format={"type": "json_object"})
    error = assert_openai_error(client.post(CHAT, json=body), 400, "response_format")
    assert "llama.cpp" in error["message"]


def test_a_body_that_is_not_a_json_object_is_400(client):
    for data in (b"{not json", b"[1, 2]", b""):
        response = client.post(CHAT, data=data, content_type="application/json")
        assert_openai_error(response, 400)


def test_a_body_over_max_request_bytes_is_413(client, app):
    limit = app.extensions["tanglebox"].settings["maxRequestBytes"]
    response = client.post(CHAT, json=chat_body("x" * (limit + 10)))
    assert_openai_error(response, 413, code="request_too_large")


def test_a_prompt_longer_than_the_context_is_400_context_length_exceeded(client, app):
    context = app.extensions["tanglebox"].engine.backend.context_length
    for stream in (False, True):
        response = client.post(CHAT, json=chat_body("x" * (context + 10), stream=stream))
        assert_openai_error(response, 400, "messages", "context_length_exceeded")


def test_unknown_paths_and_methods_under_v1_answer_in_openai_shape(client):
    assert_openai_error(client.get("/v1/nothing-here"), 404)
    assert_openai_error(client.post("/v1/models"), 405)


# -- the doors -------------------------------------------------------------------------------

@pytest.mark.parametrize("settings_values", [served(isApiTokensRequired=True)])
def test_tokens_are_required_on_every_v1_route(client, tmp_path):
    (tmp_path / "apiTokens.txt").write_text("alice:secret-token-1\n")
    for method, path, body in (("get", "/v1/models", None), ("post", CHAT, chat_body()),
                               ("post", "/v1/completions", {"prompt": "hi"}),
                               ("post", "/v1/embeddings", {"input": "hi"})):
        response = getattr(client, method)(path, json=body)
        assert_openai_error(response, 401, code="invalid_api_key")
        response = getattr(client, method)(path, json=body,
                                           headers={"Authorization": "Bearer wrong"})
        assert_openai_error(response, 401)
    ok = client.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer secret-token-1"})
    assert ok.status_code == 200


@pytest.mark.parametrize("settings_values", [served(maintenanceMode=True)])
def test_maintenance_is_503_with_retry_after(client):
    response = client.post(CHAT, json=chat_body())
    assert_openai_error(response, 503, code="maintenance")
    assert int(response.headers["Retry-After"]) > 0


@pytest.mark.parametrize("settings_values", [served(enableApi=False)])
def test_enable_api_false_hides_v1(client):
    assert client.get("/v1/models").status_code == 404
    assert client.post(CHAT, json=chat_body()).status_code == 404


def test_browser_pages_of_other_origins_are_refused(client):
    headers = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    assert client.post(CHAT, json=chat_body(), headers=headers).status_code == 403
    response = client.get("/v1/models", headers={"Sec-Fetch-Site": "cross-site"})
    assert response.status_code == 403
    assert "Access-Control-Allow-Origin" not in response.headers


@pytest.mark.parametrize("settings_values", [served(allowedOrigins=["https://app.example"])])
def test_allowed_origins_get_cors_and_preflight(client):
    headers = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    preflight = client.options(CHAT, headers=headers)
    assert preflight.status_code == 204
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    response = client.post(CHAT, json=chat_body(), headers={"Origin": "https://app.example"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == "https://app.example"


@pytest.mark.parametrize("settings_values", [served(queueSize=0)])
def test_a_full_queue_is_503_with_retry_after(client, app, fake_backend):
    engine = app.extensions["tanglebox"].engine
    busy = [engine.submit(ChatRequest((Message(USER, "count 1000"),), "", 0.0, 4000))
            for _ in range(fake_backend.max_sequences)]
    try:
        response = client.post(CHAT, json=chat_body())
        assert_openai_error(response, 503, code="queue_full")
        assert int(response.headers["Retry-After"]) > 0
    finally:
        for generation in busy:
            generation.cancel()


@pytest.mark.parametrize("settings_values", [served(queuePerClient=1, parallelSlots=1)])
@pytest.mark.parametrize("fake_backend", [FakeBackend(max_sequences=1, step_delay=0.01)])
def test_a_client_past_its_queue_share_is_429(client, app):
    engine = app.extensions["tanglebox"].engine
    running = engine.submit(ChatRequest((Message(USER, "count 5000"),), "", 0.0, 4000,
                                        client_id="127.0.0.1"))
    wait_until(lambda: engine.load()["busy"] == 1, what="the first reply running")
    waiting = engine.submit(ChatRequest((Message(USER, "echo hi"),), "", 0.0, 10,
                                        client_id="127.0.0.1"))
    try:
        response = client.post(CHAT, json=chat_body(),
                               environ_base={"REMOTE_ADDR": "127.0.0.1"})
        error = assert_openai_error(response, 429, code="client_queue_full")
        assert error["type"] == "rate_limit_error"
        assert int(response.headers["Retry-After"]) > 0
    finally:
        running.cancel()
        waiting.cancel()


def test_a_model_still_loading_is_503(tmp_path):
    from tanglebox.runtime import Runtime
    from tanglebox.web import create_app
    settings = load_settings(write_settings(tmp_path, **served()))
    client = create_app(settings, Runtime(settings)).test_client()
    response = client.post(CHAT, json=chat_body())
    assert_openai_error(response, 503, code="loading")
    assert int(response.headers["Retry-After"]) > 0


def test_offered_tools_are_ignored_and_answered_in_text(client):
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    body = client.post(CHAT, json=chat_body(tools=tools)).get_json()
    assert body["choices"][0]["message"]["content"] == "Hello there"

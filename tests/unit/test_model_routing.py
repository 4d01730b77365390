"""Choosing a model: a local fake model and a remote one (tests/fake_upstream.py) on one app,
through the OpenAI API, REST and the original socket; /health; remote models only."""

from __future__ import annotations

import json

import pytest

from tanglebox.runtime import Runtime
from tanglebox.serving import start_remotes
from tanglebox.served_models import ModelState
from tanglebox.settings import load_settings
from tanglebox.web import create_app
from tanglebox.web.original_socket import serve
from tests.fake_upstream import FakeUpstream
from tests.unit.test_openai_api import assert_openai_error, sse_events
from tests.unit.test_original_socket_protocol import ScriptedSocket
from tests.unit.test_remote_engine import wait_until

KEY = "sk-routing-secret-77"
LOCAL, REMOTE = "fake-model.gguf", "big"
CHAT = "/v1/chat/completions"


def endpoint(upstream: FakeUpstream, **fields) -> dict:
    return {"name": REMOTE, "baseUrl": upstream.base_url, "model": "fake-model",
            "apiKeyEnv": "FAKE_KEY", **fields}


@pytest.fixture
def upstream(monkeypatch):
    monkeypatch.setenv("FAKE_KEY", KEY)
    with FakeUpstream(key=KEY) as fake:
        yield fake


@pytest.fixture
def settings_values(upstream):
    return {"modelName": "models/fake-model.gguf", "temperature": 0,
            "remoteEndpoints": [endpoint(upstream)]}


def started(runtime: Runtime, ready: bool = True) -> Runtime:
    start_remotes(runtime)
    if ready:
        wait_until(lambda: all(r.state == ModelState.READY for r in runtime.remotes.values()),
                   "the remote model to be ready")
    return runtime


@pytest.fixture
def runtime(app):
    runtime = started(app.extensions["tanglebox"])
    yield runtime
    for remote in runtime.remotes.values():
        remote.stop(drain_seconds=0)


def chat(model: str | None, text: str = "echo local words", **extra) -> dict:
    body = {"messages": [{"role": "user", "content": text}], **extra}
    return body if model is None else {"model": model, **body}


# -- the OpenAI API --------------------------------------------------------------------------

def test_models_lists_the_local_model_then_the_remote_one(client, runtime):
    assert [m["id"] for m in client.get("/v1/models").get_json()["data"]] == [LOCAL, REMOTE]
    assert client.get(f"/v1/models/{REMOTE}").get_json()["id"] == REMOTE


def test_the_model_field_routes_each_request(client, runtime, upstream):
    remote = client.post(CHAT, json=chat(REMOTE)).get_json()
    local = client.post(CHAT, json=chat(LOCAL)).get_json()
    default = client.post(CHAT, json=chat(None)).get_json()
    assert (remote["model"], remote["choices"][0]["message"]["content"]) == (REMOTE,
                                                                            "Hello, world")
    assert remote["usage"]["completion_tokens"] == 3
    assert (local["model"], local["choices"][0]["message"]["content"]) == (LOCAL, "local words")
    assert default["model"] == LOCAL
    assert len(upstream.requests) == 1
    assert upstream.requests[0]["messages"] == [{"role": "user", "content": "echo local words"}]


def test_an_unknown_model_is_404_listing_every_id(client, runtime):
    error = assert_openai_error(client.post(CHAT, json=chat("nope")), 404, "model",
                                "model_not_found")
    assert LOCAL in error["message"] and REMOTE in error["message"]


def test_a_remote_stream_killed_mid_reply_ends_with_the_text_and_an_error(client, runtime,
                                                                          upstream):
    upstream.mode, upstream.die_after = "die", 2
    events = sse_events(client.post(CHAT, json=chat(REMOTE, stream=True)))
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if "choices" in e)
    assert text == "Hello, "
    assert "[DONE]" not in events
    assert "stopped in the middle of the reply" in events[-1]["error"]["message"]


def test_an_upstream_error_is_a_502_without_the_upstream_s_words(client, runtime, upstream):
    upstream.mode, upstream.status = "status", 500
    error = assert_openai_error(client.post(CHAT, json=chat(REMOTE)), 502,
                                code="upstream_error")
    assert error["message"] == "The model big could not answer (its server said HTTP 500)."


def test_log_probabilities_from_a_remote_model_are_a_clear_400(client, runtime):
    assert_openai_error(client.post(CHAT, json=chat(REMOTE, logprobs=True, top_logprobs=2)),
                        400, "logprobs")


def test_embeddings_are_the_local_model_s_only(client, runtime):
    response = client.post("/v1/embeddings", json={"model": REMOTE, "input": "hi"})
    assert_openai_error(response, 400, "model", "model_cannot_embed")


# -- a remote model that is down, or refuses the key -----------------------------------------

def test_an_upstream_down_shows_in_health_and_refuses_only_its_model(client, runtime, upstream):
    upstream.down()
    remote = runtime.remotes[REMOTE]
    remote._next_probe = 0  # check now rather than in READY_PROBE_SECONDS
    wait_until(lambda: remote.state == ModelState.UNAVAILABLE, "the failed check")
    health = client.get("/health")
    assert health.status_code == 200
    models = {m["id"]: m for m in health.get_json()["models"]}
    assert models[LOCAL]["state"] == "ready"
    assert (models[REMOTE]["state"], models[REMOTE]["detail"]) == ("unavailable",
                                                                    "connection refused")
    refused = client.post(CHAT, json=chat(REMOTE))
    error = assert_openai_error(refused, 503)
    assert error["message"] == "The model big is unavailable; try again later."
    assert refused.headers["Retry-After"]
    assert client.post(CHAT, json=chat(LOCAL)).status_code == 200
    upstream.up()
    wait_until(lambda: remote.state == ModelState.READY, "the endpoint to come back")
    assert client.post(CHAT, json=chat(REMOTE)).status_code == 200


def test_an_upstream_gone_between_checks_is_503_and_marked_at_once(client, runtime, upstream):
    upstream.down()  # the next check is READY_PROBE_SECONDS away: the request finds out
    refused = client.post(CHAT, json=chat(REMOTE))
    error = assert_openai_error(refused, 503, code="model_unavailable")
    assert error["message"] == "The model big is unavailable; try again later."
    assert refused.headers["Retry-After"]
    models = {m["id"]: m for m in client.get("/health").get_json()["models"]}
    assert models[REMOTE]["state"] == "unavailable"


def test_a_wrong_key_is_in_health_for_the_operator_and_unavailable_for_users(
        app, client, monkeypatch, upstream):
    monkeypatch.setenv("FAKE_KEY", "sk-wrong-one")
    runtime = started(app.extensions["tanglebox"], ready=False)
    try:
        wait_until(lambda: runtime.remotes[REMOTE].state == ModelState.UNAVAILABLE,
                   "the failed check")
        health = client.get("/health").get_data(as_text=True)
        assert "401 from upstream: check apiKeyEnv FAKE_KEY" in health
        answer = client.post(CHAT, json=chat(REMOTE)).get_data(as_text=True)
        assert "The model big is unavailable; try again later." in answer
        assert "sk-wrong-one" not in health + answer
    finally:
        runtime.remotes[REMOTE].stop(drain_seconds=0)


# -- REST ------------------------------------------------------------------------------------

def test_rest_model_parameter_routes_and_defaults_to_the_local_model(client, runtime):
    remote = client.post("/conversation", json={"userPrompt": "hi", "model": REMOTE},
                         headers={"Accept": "application/json"}).get_json()
    assert (remote["response"], remote["model"]) == ("Hello, world", REMOTE)
    local = client.get("/conversation", query_string={"userPrompt": "echo plain"})
    assert local.get_data(as_text=True) == "plain"


def test_rest_unknown_model_is_400_naming_it_and_listing_the_ids(client, runtime):
    response = client.post("/conversation", json={"userPrompt": "hi", "model": "nope"})
    text = response.get_data(as_text=True)
    assert response.status_code == 400
    assert text.startswith("model: ") and LOCAL in text and REMOTE in text


def test_rest_upstream_failure_is_502(client, runtime, upstream):
    upstream.mode = "malformed"
    response = client.post("/conversation", json={"userPrompt": "hi", "model": REMOTE})
    assert response.status_code == 502
    assert "could not be read" in response.get_data(as_text=True)


# -- the original socket ---------------------------------------------------------------------

def test_set_model_switches_this_socket_s_model(runtime):
    ws = ScriptedSocket(["#-set-streaming-#false", "echo local", f"#-set-model-#{REMOTE}", "hi",
                         "#-get-config-#", "#-set-model-#", "echo back"])
    serve(ws, runtime, client_id="", authenticated=True)
    assert ws.sent[:8] == ["#-set-#", "#a-c-k#", "local", "#f-i-n#",
                           "#-set-#", "#a-c-k#", "Hello, world", "#f-i-n#"]
    assert ws.sent[8:10] == [f"#-model-name-#{REMOTE}", "#-device-name-#remote"]
    assert ws.sent[-4:] == ["#-set-#", "#a-c-k#", "back", "#f-i-n#"]


def test_set_model_to_an_unknown_id_is_an_error_and_keeps_the_model(runtime):
    ws = ScriptedSocket(["#-set-streaming-#false", "#-set-model-#nope", "echo still local"])
    serve(ws, runtime, client_id="", authenticated=True)
    assert ws.sent[1].startswith("Error: model: must be the id of a served model")
    assert REMOTE in ws.sent[1] and ws.sent[1].endswith("send #-set-model-#<id>")
    assert ws.sent[2:] == ["#a-c-k#", "still local", "#f-i-n#"]


# -- remote models only ----------------------------------------------------------------------

def test_with_no_local_model_the_first_remote_is_the_default(tmp_path, upstream):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"modelName": "", "remoteEndpoints": [endpoint(upstream)]}))
    runtime = started(Runtime(load_settings(path)))
    try:
        client = create_app(runtime.settings, runtime).test_client()
        health = client.get("/health")
        assert health.status_code == 200
        assert [m["id"] for m in health.get_json()["models"]] == [REMOTE]
        assert client.get("/conversation", query_string={"userPrompt": "hi"}).get_data(
            as_text=True) == "Hello, world"
        assert [m["id"] for m in client.get("/v1/models").get_json()["data"]] == [REMOTE]
    finally:
        runtime.remotes[REMOTE].stop(drain_seconds=0)

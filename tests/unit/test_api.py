"""``/conversation`` on the fake backend through Flask's test client: the original contract,
every 400, tokens, maintenance, CORS and the reply formats."""

from __future__ import annotations

import json

import pytest

from tanglebox.api_tokens import HEADER, add_token, hash_token, revoke_token
from tanglebox.chat_request import ChatRequest
from tanglebox.prompting import USER, Message
from tanglebox.runtime import Runtime
from tanglebox.settings import load_settings
from tanglebox.web import create_app
from tests.fake_backend import SPECIALS, FakeBackend

SPECIAL_NAMES = {token: name for name, token in SPECIALS.items()}
HISTORY = [["Human", "how do magnets work?"], ["AI", "They just do."]]


@pytest.fixture
def fake_backend(request):
    """``@pytest.mark.parametrize("fake_backend", [{...}], indirect=True)`` to configure it."""
    return FakeBackend(**getattr(request, "param", {}))


def prompt_text(backend: FakeBackend, containing: str) -> str:
    """The prompt the model was given (special tokens spelled out), found by its content."""
    for sequence in backend.sequences:
        text = "".join(SPECIAL_NAMES.get(t) or chr(t) for t in sequence)
        if containing in text:
            return text
    raise AssertionError(f"no prompt contained {containing!r}")


def sse_events(body: str) -> list[tuple[str, dict]]:
    events = []
    for block in body.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


# -- the original contract -------------------------------------------------------------------

def test_get_with_query_parameters_answers_plain_text(client):
    response = client.get("/conversation", query_string={"userPrompt": "echo Hello there"})
    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert response.text == "Hello there"


def test_post_json_answers_plain_text(client):
    response = client.post("/conversation", json={"userPrompt": "echo from JSON"})
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert response.text == "from JSON"


def test_post_form_answers_plain_text(client):
    response = client.post("/conversation", data={"userPrompt": "echo from a form",
                                                  "temperature": "0", "maxNewTokens": "64"})
    assert response.status_code == 200 and response.text == "from a form"


def test_post_without_a_body_reads_the_query_string(client):
    response = client.post("/conversation?userPrompt=echo+query")
    assert response.status_code == 200 and response.text == "query"


@pytest.mark.parametrize("send", [
    lambda c: c.get("/conversation", query_string={"userPrompt": "echo ok",
                                                   "conversationHistory": json.dumps(HISTORY)}),
    lambda c: c.post("/conversation", data={"userPrompt": "echo ok",
                                            "conversationHistory": json.dumps(HISTORY)}),
    lambda c: c.post("/conversation", json={"userPrompt": "echo ok",
                                            "conversationHistory": HISTORY}),
    lambda c: c.post("/conversation", json={"userPrompt": "echo ok",
                                            "conversationHistory": json.dumps(HISTORY)}),
], ids=["get", "form", "json-array", "json-string"])
def test_history_roles_map_to_the_templates_roles(client, fake_backend, send):
    response = send(client)
    assert response.status_code == 200 and response.text == "ok"
    prompt = prompt_text(fake_backend, "echo ok")
    assert ("<|user|>how do magnets work?<|end|><|assistant|>They just do.<|end|>"
            "<|user|>echo ok<|end|><|assistant|>") in prompt
    assert "Human" not in prompt and "AI" not in prompt


def test_system_prompt_replaces_the_default(client, fake_backend):
    client.post("/conversation", json={"userPrompt": "echo x", "systemPrompt": "Be a pirate."})
    assert prompt_text(fake_backend, "echo x").startswith("<|system|>Be a pirate.<|end|>")


def test_max_new_tokens_caps_the_reply(client):
    response = client.post("/conversation", json={"userPrompt": "count 50", "maxNewTokens": 3},
                           headers={"Accept": "application/json"})
    assert response.json["response"] == "1 2"
    assert response.json["finishReason"] == "length"
    assert response.json["usage"]["completionTokens"] == 3


@pytest.mark.parametrize("flag", [True, "true", "True"])
def test_streaming_gives_the_same_text_in_chunks(client, flag):
    response = client.post("/conversation", json={"userPrompt": "count 5",
                                                  "shouldStreamResponse": flag})
    assert response.status_code == 200 and response.mimetype == "text/plain"
    assert "Content-Length" not in response.headers  # sent in chunks, length unknown upfront
    assert response.headers["X-Accel-Buffering"] == "no"
    assert response.text == "1 2 3 4 5"


@pytest.mark.parametrize("flag", [False, "false", ""])
def test_streaming_off_gives_the_whole_reply(client, flag):
    response = client.get("/conversation", query_string={"userPrompt": "count 3",
                                                         "shouldStreamResponse": flag})
    assert response.status_code == 200
    assert response.headers["Content-Length"] == "5"
    assert response.text == "1 2 3"


def test_accept_json_gives_the_reply_usage_timings_and_model(client):
    response = client.post("/conversation", json={"userPrompt": "echo hi"},
                           headers={"Accept": "application/json"})
    assert response.status_code == 200 and response.mimetype == "application/json"
    body = response.json
    assert list(body) == ["response", "finishReason", "usage", "timings", "model"]
    assert body["response"] == "hi" and body["finishReason"] == "stop"
    assert body["usage"]["promptTokens"] > 0 and body["usage"]["completionTokens"] == 2
    assert set(body["timings"]) >= {"queueMs", "promptMs", "generationMs", "tokensPerSecond"}
    assert body["model"] == "fake-model"


def test_accept_event_stream_gives_delta_events_then_done(client):
    response = client.post("/conversation", json={"userPrompt": "count 3"},
                           headers={"Accept": "text/event-stream"})
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names == ["delta"] * (len(events) - 1) + ["done"]
    assert "".join(data["text"] for name, data in events[:-1]) == "1 2 3"
    assert events[-1][1]["response"] == "1 2 3" and events[-1][1]["finishReason"] == "stop"


def test_a_browser_accept_header_gets_plain_text(client):
    response = client.get("/conversation?userPrompt=echo+hi",
                          headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert response.mimetype == "text/plain" and response.text == "hi"


# -- bad input: 400 naming the parameter ------------------------------------------------------

BAD_QUERIES = [
    ({}, "userPrompt"),
    ({"userPrompt": ""}, "userPrompt"),
    ({"userPrompt": "   "}, "userPrompt"),
    ({"userPrompt": "hi", "conversationHistory": "not json"}, "conversationHistory"),
    ({"userPrompt": "hi", "conversationHistory": '{"Human": "hi"}'}, "conversationHistory"),
    ({"userPrompt": "hi", "conversationHistory": '[["Human"]]'}, "conversationHistory[0]"),
    ({"userPrompt": "hi", "conversationHistory": '[["Human","a"],["Bot","b"]]'},
     "conversationHistory[1]"),
    ({"userPrompt": "hi", "conversationHistory": '[["Human", 42]]'}, "conversationHistory[0]"),
    ({"userPrompt": "hi", "temperature": "warm"}, "temperature"),
    ({"userPrompt": "hi", "temperature": "nan"}, "temperature"),
    ({"userPrompt": "hi", "temperature": "inf"}, "temperature"),
    ({"userPrompt": "hi", "temperature": "-0.1"}, "temperature"),
    ({"userPrompt": "hi", "temperature": "2.5"}, "temperature"),
    ({"userPrompt": "hi", "maxNewTokens": "0"}, "maxNewTokens"),
    ({"userPrompt": "hi", "maxNewTokens": "-5"}, "maxNewTokens"),
    ({"userPrompt": "hi", "maxNewTokens": "1.5"}, "maxNewTokens"),
    ({"userPrompt": "hi", "maxNewTokens": "ten"}, "maxNewTokens"),
    ({"userPrompt": "hi", "maxNewTokens": str(10 ** 9)}, "maxNewTokens"),
    ({"userPrompt": "hi", "shouldStreamResponse": "yes"}, "shouldStreamResponse"),
]


@pytest.mark.parametrize("query, param", BAD_QUERIES)
def test_bad_query_parameters_are_400_naming_the_parameter(client, query, param):
    response = client.get("/conversation", query_string=query)
    assert response.status_code == 400
    assert response.text.startswith(param + ":")


@pytest.mark.parametrize("query, param", BAD_QUERIES[:8])
def test_bad_form_fields_are_400_naming_the_parameter(client, query, param):
    response = client.post("/conversation", data=query)
    assert response.status_code == 400
    assert response.text.startswith(param + ":")


@pytest.mark.parametrize("body, param", [
    ({"userPrompt": 42}, "userPrompt"),
    ({"userPrompt": None}, "userPrompt"),
    ({"userPrompt": ["hi"]}, "userPrompt"),
    ({"userPrompt": "hi", "systemPrompt": 7}, "systemPrompt"),
    ({"userPrompt": "hi", "conversationHistory": [["Human", "a"], ["AI", None]]},
     "conversationHistory[1]"),
    ({"userPrompt": "hi", "conversationHistory": {"Human": "a"}}, "conversationHistory"),
    ({"userPrompt": "hi", "conversationHistory": [["Human", "a", "b"]]},
     "conversationHistory[0]"),
    ({"userPrompt": "hi", "temperature": True}, "temperature"),
    ({"userPrompt": "hi", "temperature": "0.5"}, "temperature"),
    ({"userPrompt": "hi", "temperature": -1}, "temperature"),
    ({"userPrompt": "hi", "temperature": 3}, "temperature"),
    ({"userPrompt": "hi", "maxNewTokens": "10"}, "maxNewTokens"),
    ({"userPrompt": "hi", "maxNewTokens": True}, "maxNewTokens"),
    ({"userPrompt": "hi", "maxNewTokens": 1.5}, "maxNewTokens"),
    ({"userPrompt": "hi", "maxNewTokens": 0}, "maxNewTokens"),
    ({"userPrompt": "hi", "maxNewTokens": 10 ** 9}, "maxNewTokens"),
    ({"userPrompt": "hi", "shouldStreamResponse": 1}, "shouldStreamResponse"),
])
def test_bad_json_fields_are_400_naming_the_parameter(client, body, param):
    response = client.post("/conversation", json=body)
    assert response.status_code == 400
    assert response.text.startswith(param + ":")


@pytest.mark.parametrize("raw", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_json_nan_and_infinity_temperatures_are_400(client, raw):
    # Python's json module accepts these non-standard literals; the rule must still refuse them.
    response = client.post("/conversation", data=f'{{"userPrompt": "hi", "temperature": {raw}}}',
                           content_type="application/json")
    assert response.status_code == 400 and response.text.startswith("temperature:")


@pytest.mark.parametrize("raw", ['"just a string"', "[1, 2]", "42", "null", "true",
                                 '{"userPrompt": "hi"', "{'single': 'quotes'}", "",
                                 "[" * 50_000, "\xff\xfe"])
def test_a_body_that_is_not_a_json_object_is_400(client, raw):
    response = client.post("/conversation", data=raw.encode("latin-1"),
                           content_type="application/json")
    assert response.status_code == 400
    assert response.text.startswith("body:")


def test_errors_are_json_for_clients_that_accept_json(client):
    response = client.post("/conversation", json={"temperature": 1},
                           headers={"Accept": "application/json"})
    assert response.status_code == 400
    assert response.json["error"]["message"].startswith("userPrompt:")


def test_text_plain_posts_are_refused(client):
    # What a cross-site <form enctype="text/plain"> sends.
    response = client.post("/conversation", data='{"userPrompt": "echo hi"}',
                           content_type="text/plain")
    assert response.status_code == 415
    assert "Content-Type: text/plain" in response.text


def test_an_unknown_body_type_is_refused(client):
    response = client.post("/conversation", data=b"userPrompt=hi",
                           content_type="application/octet-stream")
    assert response.status_code == 415 and "Content-Type" in response.text


@pytest.mark.parametrize("settings_values", [{"maxRequestBytes": 2048}])
@pytest.mark.parametrize("send", [
    lambda c, big: c.post("/conversation", json={"userPrompt": big}),
    lambda c, big: c.post("/conversation", data={"userPrompt": big}),
    lambda c, big: c.post("/conversation", data=big, content_type="text/plain"),
], ids=["json", "form", "text"])
def test_a_body_over_the_limit_is_413_before_parsing(client, send):
    response = send(client, "x" * 3000)
    assert response.status_code == 413
    assert "maxRequestBytes" in response.text


@pytest.mark.parametrize("fake_backend", [{"context_length": 64}], indirect=True)
@pytest.mark.parametrize("accept, stream", [("text/plain", False), ("text/plain", True),
                                            ("application/json", False),
                                            ("text/event-stream", True)])
def test_a_prompt_longer_than_the_context_is_400_with_the_counts(client, accept, stream):
    response = client.post("/conversation", json={"userPrompt": "tell me " * 20,
                                                  "shouldStreamResponse": stream},
                           headers={"Accept": accept})
    assert response.status_code == 400
    message = response.json["error"]["message"] if accept == "application/json" else response.text
    assert message.startswith("userPrompt + conversationHistory:")
    assert "context holds 64" in message and "tokens" in message


# -- availability ----------------------------------------------------------------------------

@pytest.mark.parametrize("settings_values", [{"enableApi": False}])
@pytest.mark.parametrize("method", ["GET", "POST", "OPTIONS"])
def test_a_disabled_api_is_404(client, method):
    response = client.open("/conversation?userPrompt=hi", method=method)
    assert response.status_code == 404


@pytest.mark.parametrize("settings_values", [{"maintenanceMode": True,
                                              "maintenanceMessage": "Back at noon."}])
def test_maintenance_is_503_with_retry_after_and_the_reason(client):
    response = client.get("/conversation?userPrompt=hi")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert response.text.strip() == "Back at noon."


def test_a_loading_model_is_503_with_retry_after(tmp_path):
    settings = load_settings(tmp_path / "settings.json")
    app = create_app(settings, Runtime(settings))  # no engine attached yet
    response = app.test_client().get("/conversation?userPrompt=hi")
    assert response.status_code == 503
    assert int(response.headers["Retry-After"]) > 0
    assert "loading" in response.text


@pytest.mark.parametrize("settings_values", [{"queueSize": 0}])
@pytest.mark.parametrize("fake_backend", [{"step_delay": 0.02}], indirect=True)
def test_a_full_queue_is_503_with_retry_after_at_once(client, app, fake_backend):
    engine = app.extensions["tanglebox"].engine
    busy = [engine.submit(ChatRequest((Message(USER, "count 1000"),), "", 0.0, 4000))
            for _ in range(fake_backend.max_sequences)]
    try:
        response = client.get("/conversation?userPrompt=hi")
        assert response.status_code == 503
        assert int(response.headers["Retry-After"]) > 0
        assert "busy" in response.text
    finally:
        for generation in busy:
            generation.cancel()


class FailingBackend(FakeBackend):
    """A model that breaks after a few decode steps."""

    def __init__(self, fail_after: int) -> None:
        super().__init__()
        self.fail_after = fail_after

    def decode(self, items):
        if len(self.decode_calls) >= self.fail_after:
            raise RuntimeError("the GPU caught fire")
        return super().decode(items)


@pytest.mark.parametrize("fake_backend", [FailingBackend(fail_after=4)])
def test_a_model_failure_mid_reply_is_an_sse_error_event(client):
    response = client.post("/conversation", json={"userPrompt": "count 20"},
                           headers={"Accept": "text/event-stream"})
    assert response.status_code == 200
    events = sse_events(response.text)
    assert events[0][0] == "delta"
    assert events[-1] == ("error", {"code": "internal",
                                    "message": "The model failed; please try again."})


@pytest.mark.parametrize("fake_backend", [FailingBackend(fail_after=4)])
def test_a_model_failure_before_the_reply_is_sent_is_500_with_a_message(client):
    response = client.post("/conversation", json={"userPrompt": "count 20"})
    assert response.status_code == 500
    assert "The model failed" in response.text and "Traceback" not in response.text


# -- tokens ----------------------------------------------------------------------------------

@pytest.fixture
def token_file(tmp_path):
    """The token file the ``app`` fixture's settings point at (apiTokens.txt beside them)."""
    return tmp_path / "apiTokens.txt"


TOKENS_REQUIRED = pytest.mark.parametrize("settings_values", [{"isApiTokensRequired": True}])


@TOKENS_REQUIRED
def test_without_a_token_it_is_401_with_www_authenticate(client, token_file):
    add_token(token_file, "alice")
    response = client.get("/conversation?userPrompt=echo+hi")
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.text.startswith("token:")


@TOKENS_REQUIRED
@pytest.mark.parametrize("headers, query", [
    ({}, {}),
    ({}, {"token": ""}),
    ({}, {"token": "wrong-token-value"}),
    ({"Authorization": "Bearer wrong-token-value"}, {}),
    ({"Authorization": "Bearer "}, {}),
    ({"Authorization": "Basic d3Jvbmc6dG9rZW4="}, {}),
    ({}, {"token": "TOKEN"}),  # the header line's placeholder
], ids=["missing", "empty", "wrong-param", "wrong-bearer", "empty-bearer", "basic",
        "placeholder"])
def test_missing_and_wrong_tokens_get_the_same_401_that_never_echoes(client, token_file,
                                                                     headers, query):
    add_token(token_file, "alice")
    reference = client.get("/conversation?userPrompt=hi")
    response = client.get("/conversation", query_string={"userPrompt": "hi", **query},
                          headers=headers)
    assert response.status_code == 401
    assert response.data == reference.data
    assert b"wrong-token-value" not in response.data


@TOKENS_REQUIRED
@pytest.mark.parametrize("send", [
    lambda c, t: c.get("/conversation", query_string={"userPrompt": "echo in", "token": t}),
    lambda c, t: c.get("/conversation?userPrompt=echo+in",
                       headers={"Authorization": f"Bearer {t}"}),
    lambda c, t: c.post("/conversation", data={"userPrompt": "echo in", "token": t}),
    lambda c, t: c.post("/conversation", json={"userPrompt": "echo in", "token": t}),
    lambda c, t: c.post("/conversation", json={"userPrompt": "echo in"},
                        headers={"Authorization": f"bearer {t}"}),
], ids=["query", "bearer", "form", "json", "lowercase-bearer"])
def test_a_valid_token_is_accepted_from_every_place(client, token_file, send):
    token = add_token(token_file, "alice")
    response = send(client, token)
    assert response.status_code == 200 and response.text == "in"


@TOKENS_REQUIRED
def test_a_hashed_token_is_accepted(client, token_file):
    token_file.write_text(f"{HEADER}\nbot:sha256:{hash_token('a-long-random-token')}\n")
    response = client.get("/conversation?userPrompt=echo+in&token=a-long-random-token")
    assert response.status_code == 200


@TOKENS_REQUIRED
def test_a_token_that_is_not_a_string_is_refused(client, token_file):
    token_file.write_text(f"{HEADER}\nnumbers:12345\n")
    response = client.post("/conversation", json={"userPrompt": "hi", "token": 12345})
    assert response.status_code == 401


@TOKENS_REQUIRED
def test_token_changes_apply_without_a_restart(client, token_file):
    assert client.get("/conversation?userPrompt=hi&token=anything").status_code == 401
    token = add_token(token_file, "alice")
    assert client.get(f"/conversation?userPrompt=hi&token={token}").status_code == 200
    revoke_token(token_file, "alice")
    assert client.get(f"/conversation?userPrompt=hi&token={token}").status_code == 401


@TOKENS_REQUIRED
def test_the_token_is_checked_before_the_parameters(client, token_file):
    add_token(token_file, "alice")
    response = client.get("/conversation?temperature=9")
    assert response.status_code == 401


def test_tokens_are_not_needed_unless_required(client, token_file):
    add_token(token_file, "alice")
    assert client.get("/conversation?userPrompt=echo+free").text == "free"


# -- CORS ------------------------------------------------------------------------------------

def access_control_headers(response) -> dict:
    return {k: v for k, v in response.headers.items() if k.lower().startswith("access-control")}


@pytest.mark.parametrize("settings_values", [{}, {"allowedOrigins": ["https://app.example"]}])
def test_a_foreign_origin_gets_no_cors_headers(client):
    origin = {"Origin": "https://evil.example"}
    preflight = client.options("/conversation", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert access_control_headers(preflight) == {}
    simple = client.get("/conversation?userPrompt=echo+hi", headers=origin)
    assert access_control_headers(simple) == {}
    post = client.post("/conversation", json={"userPrompt": "echo hi"}, headers=origin)
    assert post.status_code == 403 and access_control_headers(post) == {}


def test_a_cross_site_text_plain_form_post_is_refused(client, fake_backend):
    response = client.post("/conversation", data="userPrompt=echo pwned",
                           content_type="text/plain",
                           headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert not any(fake_backend.sequences)  # the model never saw it


def test_a_cross_site_page_cannot_make_a_browser_send_a_prompt(client, fake_backend):
    # <img src="http://localhost:8080/conversation?userPrompt=..."> on another site: no Origin
    response = client.get("/conversation?userPrompt=echo+pwned",
                          headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"})
    assert response.status_code == 403 and "allowedOrigins" in response.text
    assert not any(fake_backend.sequences)  # the model never saw it
    same_site = client.get("/conversation?userPrompt=echo+ok",
                           headers={"Sec-Fetch-Site": "same-origin"})
    assert same_site.status_code == 200 and same_site.text == "ok"


@pytest.mark.parametrize("settings_values", [{"allowedOrigins": ["https://app.example"]}])
def test_an_allowed_origin_gets_a_preflight_answer_and_its_own_origin_back(client):
    origin = {"Origin": "https://app.example"}
    preflight = client.options("/conversation", headers={
        **origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204
    headers = access_control_headers(preflight)
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert "authorization" in headers["Access-Control-Allow-Headers"].lower()
    assert "Access-Control-Allow-Credentials" not in headers
    post = client.post("/conversation", json={"userPrompt": "echo hi"},
                       headers={**origin, "Sec-Fetch-Site": "cross-site"})
    assert post.status_code == 200 and post.text == "hi"
    assert post.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "Origin" in post.headers["Vary"]
    refused = client.post("/conversation", json={}, headers=origin)
    assert refused.status_code == 400  # errors readable by the allowed page too
    assert refused.headers["Access-Control-Allow-Origin"] == "https://app.example"

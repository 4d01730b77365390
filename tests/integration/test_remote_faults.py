"""Remote engines when the upstream misbehaves (issue 16, item 4), through a live front server
(gunicorn + gevent) with real clients on each surface the fault concerns.

One front serves four endpoints, each a fake upstream in this process
(``tests/fake_upstream.py``): ``flaky`` (the default model; each test sets what it does; its
``timeoutSeconds`` is past every deadline here, so only a cancel closes a stalled stream in
time), ``slow`` (a 1 s ``timeoutSeconds``), ``locked`` (it wants a key the front does not have) and
``down`` (its port closed until a test opens it). The promises: a fault ends a reply with the
text so far and a clear error on every surface, never a hang; an upstream error is a 502 that
says what happened; a key the upstream refuses is the operator's news (log, /health), never
shown to users and never written anywhere; a client that goes away closes the upstream stream;
a down endpoint comes back by itself.
"""

from __future__ import annotations

import json
from contextlib import closing

import openai
import pytest
import requests

from tests.fake_upstream import FakeUpstream
from tests.integration.test_concurrency import original_socket, within
from tests.integration.test_ui_socket import (ChatClient, element, shown_reply, shown_text,
                                              targets)
from tests.live_server import LiveServer, wait_until
from tests.upstreams import endpoint, front_server, model_health, sdk

WRONG_KEY = "tbx-wrong-key-1a2b3c4d5e6f7a8b"
RIGHT_KEY = "tbx-right-key-9f8e7d6c5b4a3f2e"
KEY_VARIABLE = "TBX_TEST_LOCKED_KEY"
PIECES = ["The", " fake", " upstream", " answers", " in", " seven", " words."]
REPLY = "".join(PIECES)
CUT_AFTER = 3  # pieces the killed upstream streams before it dies
SO_FAR = "".join(PIECES[:CUT_AFTER])
NO_HANG = 30.0  # seconds: a reply still open after this is a hang
QUESTION = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def fakes():
    with FakeUpstream() as flaky, FakeUpstream() as slow, FakeUpstream(key=RIGHT_KEY) as locked, \
            FakeUpstream() as down:
        down.down()  # a known port with nothing on it, until a test opens it
        for fake in (flaky, slow, locked, down):
            fake.pieces = PIECES
        yield {"flaky": flaky, "slow": slow, "locked": locked, "down": down}


@pytest.fixture(scope="module")
def front(tmp_path_factory, fakes):
    endpoints = [endpoint("flaky", fakes["flaky"].base_url, timeoutSeconds=120),
                 endpoint("slow", fakes["slow"].base_url, timeoutSeconds=1),
                 endpoint("locked", fakes["locked"].base_url, apiKeyEnv=KEY_VARIABLE),
                 endpoint("down", fakes["down"].base_url)]
    with front_server(tmp_path_factory.mktemp("front"), endpoints,
                      env={KEY_VARIABLE: WRONG_KEY}) as server:
        yield server
    assert "Traceback" not in server.log()
    assert WRONG_KEY not in server.log()


@pytest.fixture
def flaky(fakes):
    """The default model's upstream, answering normally until the test says otherwise."""
    fake = fakes["flaky"]
    fake.mode, fake.die_after, fake.stall_after = "ok", CUT_AFTER, 1
    fake.release.clear()
    fake.client_gone.clear()
    yield fake
    fake.release.set()  # a stalled stream the test left ends


def rest(server: LiveServer, model: str, accept: str = "application/json",
         read_later: bool = False, **params) -> requests.Response:
    """POST /conversation; with ``read_later`` the body is left to read (or not)."""
    return requests.post(server.url + "/conversation", timeout=NO_HANG, stream=read_later,
                         headers={"Accept": accept},
                         json={"userPrompt": "hello", "model": model, **params})


def ask(server: LiveServer, model: str, **params):
    """A chat completion through the official OpenAI client."""
    return sdk(server.url, timeout=NO_HANG).chat.completions.create(
        model=model, messages=QUESTION, **params)


def checked_health(server: LiveServer, model_id: str) -> dict:
    """The model's /health entry once the front's first check of its endpoint is done."""
    return wait_until(lambda: (m := model_health(server, model_id))["state"] != "loading" and m,
                      NO_HANG, f"the first check of {model_id}")


def error_message(reply: requests.Response) -> str:
    body = reply.json()
    return body["error"]["message"] if isinstance(body.get("error"), dict) else body["error"]


# -- down at start, back by itself -----------------------------------------------------------

def test_an_upstream_down_at_start_is_unavailable_and_comes_back_by_itself(front, fakes, flaky):
    status = checked_health(front, "down")
    assert status["state"] == "unavailable" and "refused" in status["detail"]
    refused = rest(front, "down")
    assert refused.status_code == 503 and "Retry-After" in refused.headers
    assert "down is unavailable" in refused.text
    with pytest.raises(openai.APIStatusError) as api_refusal:
        ask(front, "down")
    assert api_refusal.value.status_code == 503 and "unavailable" in api_refusal.value.message
    # The rest of the server works meanwhile.
    assert rest(front, "flaky").json()["response"] == REPLY

    fakes["down"].up()  # on the same port
    wait_until(lambda: model_health(front, "down")["state"] == "ready", NO_HANG,
               "the endpoint that came up shows ready")
    reply = ask(front, "down")
    assert reply.choices[0].message.content == REPLY


# -- killed mid-reply: the text so far, then a clear error, on every surface ----------------

def test_killed_mid_reply_a_plain_text_stream_ends_without_its_final_chunk(front, flaky):
    flaky.mode = "die"

    def read() -> str:
        received = b""
        with rest(front, "flaky", "text/plain", read_later=True,
                  shouldStreamResponse=True) as reply:
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                for chunk in reply.iter_content(chunk_size=None):
                    received += chunk
        return received.decode()
    assert within(NO_HANG, read) == SO_FAR


def test_killed_mid_reply_server_sent_events_end_with_an_error_event(front, flaky):
    flaky.mode = "die"
    reply = within(NO_HANG, lambda: rest(front, "flaky", "text/event-stream"))
    events, name = [], None
    for line in reply.text.splitlines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    assert "".join(data["text"] for name, data in events if name == "delta") == SO_FAR
    assert events[-1][0] == "error" and "middle of the reply" in events[-1][1]["message"]


def test_killed_mid_reply_a_whole_rest_reply_is_a_502(front, flaky):
    flaky.mode = "die"
    reply = within(NO_HANG, lambda: rest(front, "flaky"))
    assert reply.status_code == 502 and "incomplete" in reply.text


def test_killed_mid_reply_the_original_socket_shows_the_text_so_far_and_an_error(front, flaky):
    flaky.mode = "die"
    with closing(original_socket(front)) as ws:
        ws.send("hello")
        messages = within(NO_HANG, lambda: receive_until_fin(ws))
    assert messages[0] == "#a-c-k#" and messages[-1] == "#f-i-n#"
    assert "".join(messages[1:-2]) == SO_FAR
    assert messages[-2].startswith("Error: ") and "middle of the reply" in messages[-2]


def receive_until_fin(ws) -> list[str]:
    messages = [ws.recv()]
    while messages[-1] != "#f-i-n#":
        messages.append(ws.recv())
    return messages


def test_killed_mid_reply_the_chat_page_keeps_the_text_so_far_and_says_why(front, flaky):
    flaky.mode = "die"
    with closing(ChatClient(front)) as page:
        fragments = within(NO_HANG, lambda: page.ask("hello"))
    assert not any("delete #turn-1" in targets(f) for f in fragments)
    assert shown_text(fragments) == SO_FAR
    errors = [element(f, "chat-error").text() for f in fragments if 'id="chat-error"' in f]
    # Said under the reply (its note) or in the error line under the conversation.
    assert "middle of the reply" in " ".join([shown_reply(fragments).text(), *errors])


def test_killed_mid_reply_an_openai_stream_raises_after_the_text_so_far(front, flaky):
    flaky.mode = "die"
    received = []

    def read() -> openai.APIError:
        with pytest.raises(openai.APIError) as cut:
            for chunk in ask(front, "flaky", stream=True):
                received.append(chunk.choices[0].delta.content or "")
        return cut.value
    error = within(NO_HANG, read)
    assert "".join(received) == SO_FAR
    assert "middle of the reply" in str(error)


# -- slow, failing and garbled upstreams -----------------------------------------------------

def test_an_upstream_that_stops_answering_times_out(front, fakes):
    fakes["slow"].mode, fakes["slow"].stall_after = "stall", 0  # headers, then nothing
    reply = within(NO_HANG, lambda: rest(front, "slow"))
    assert reply.status_code in (502, 504), reply.text
    assert "slow did not answer in time" in error_message(reply)
    with pytest.raises(openai.APIStatusError) as api_error:
        within(NO_HANG, lambda: ask(front, "slow"))
    assert api_error.value.status_code in (502, 504)
    assert "did not answer in time" in api_error.value.message
    assert "no data from the upstream" in front.log()  # the operator's side of it


@pytest.mark.parametrize("mode, status, says", [
    ("status", 500, "HTTP 500"),
    ("status", 400, "HTTP 400"),
    ("malformed", 200, "could not be read"),
])
def test_an_upstream_error_or_malformed_json_is_a_502_that_says_so(front, flaky, mode, status,
                                                                   says):
    flaky.mode, flaky.status = mode, status
    reply = rest(front, "flaky")
    assert reply.status_code == 502 and says in error_message(reply)
    with pytest.raises(openai.APIStatusError) as api_error:
        ask(front, "flaky")
    assert api_error.value.status_code == 502 and says in api_error.value.message
    assert "Traceback" not in front.log()
    flaky.mode = "ok"  # and the endpoint still serves
    assert rest(front, "flaky").json()["response"] == REPLY


# -- a wrong key -----------------------------------------------------------------------------

def test_a_wrong_key_is_the_operators_news_and_never_shown(front, fakes):
    status = checked_health(front, "locked")
    assert status["state"] == "unavailable"
    assert "401" in status["detail"] and KEY_VARIABLE in status["detail"]
    assert "GET /v1/models" in fakes["locked"].paths  # the front asked, and was refused
    answers = [rest(front, "locked"), rest(front, "locked", "text/plain"),
               requests.get(front.url + "/health", timeout=NO_HANG),
               requests.get(front.url + "/v1/models", timeout=NO_HANG)]
    assert answers[0].status_code == 503 and "locked is unavailable" in answers[0].text
    with pytest.raises(openai.APIStatusError) as api_refusal:
        ask(front, "locked")
    assert "unavailable" in api_refusal.value.message
    assert "check apiKeyEnv" in front.log()  # the operator's log says what to fix
    for text in [a.text for a in answers] + [api_refusal.value.response.text, front.log()]:
        assert WRONG_KEY not in text and WRONG_KEY[-12:] not in text


# -- cancel: a client that goes away closes the upstream stream ------------------------------

def test_a_rest_client_that_hangs_up_closes_the_upstream_stream(front, flaky):
    flaky.mode = "stall"
    with rest(front, "flaky", "text/plain", read_later=True,
              shouldStreamResponse=True) as reply:
        assert next(reply.iter_content(chunk_size=None))
    assert flaky.client_gone.wait(NO_HANG)
    wait_until(lambda: model_health(front, "flaky")["busy"] == 0, NO_HANG, "the slot is free")


def test_an_openai_client_that_hangs_up_closes_the_upstream_stream(front, flaky):
    flaky.mode = "stall"
    stream = ask(front, "flaky", stream=True)
    with stream:
        assert next(iter(stream))
    assert flaky.client_gone.wait(NO_HANG)


def test_stop_on_the_chat_page_closes_the_upstream_stream(front, flaky):
    flaky.mode = "stall"
    with closing(ChatClient(front)) as page:
        page.send(userPrompt="hello")
        within(NO_HANG, lambda: receive_until_shown(page, PIECES[0]))
        page.send(action="stop")
        assert flaky.client_gone.wait(NO_HANG)
        page.receive_until_composer_enabled()


def test_an_original_socket_that_closes_closes_the_upstream_stream(front, flaky):
    flaky.mode = "stall"
    ws = original_socket(front)
    ws.send("hello")
    assert ws.recv() == "#a-c-k#" and ws.recv() == PIECES[0]
    ws.close()
    assert flaky.client_gone.wait(NO_HANG)


def receive_until_shown(page: ChatClient, text: str) -> None:
    fragments = [page.receive()]
    while shown_text(fragments) != text:
        fragments.append(page.receive())

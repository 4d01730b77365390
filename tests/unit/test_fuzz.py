"""A small fuzz run (bench/fuzz.py's strategies, 80 to 200 cases a surface) in-process: REST
through Flask's test client (JSON, form, query string, random bodies), and both sockets'
message handling with a socket object that records what is sent. The rule: no 5xx, no
traceback, nothing logged as an error, an answer to every probe, ``/health`` fine after each.

Chunked bodies and the sockets over the wire: tests/integration/test_input_hardening_live.py.
The long run: ``python -m bench.fuzz --minutes N`` (docs/reliability.md).
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from bench.fuzz import (OPENAI_PATHS, OPENAI_SEEDS, PING, PONG, REST_SEEDS, UI_PROBE, UI_SEEDS,
                        RestCase, form_bytes, json_bytes, openai_bodies, openai_problem,
                        original_messages, rest_cases, rest_problem, socket_problem,
                        ui_messages)
from tanglebox.web.original_socket import serve
from tanglebox.web.ui_conversation import PAGE, new_conversation
from tanglebox.web.ui_socket import ChatSocket


def small_run(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


class RecordingSocket:
    """Stands in for simple-websocket's Server: plays ``incoming``, records what is sent, and
    encodes it as a real socket would (a lone surrogate in a fragment cannot go out)."""

    def __init__(self, incoming: list = ()) -> None:
        self.incoming = list(incoming)
        self.sent: list[str] = []
        self.connected = True
        self.input_buffer = ()

    def receive(self, timeout: float | None = None):
        return self.incoming.pop(0) if self.incoming else None  # None: idle

    def send(self, text: str) -> None:
        text.encode("utf-8")
        self.sent.append(text)

    def close(self, reason: int = 1000, message: str = "") -> None:
        self.connected = False


@pytest.fixture
def errors_logged(caplog):
    def records() -> list[str]:
        found = [f"{r.name}: {r.getMessage()}" for r in caplog.records
                 if r.levelno >= logging.ERROR]
        caplog.clear()
        return found
    caplog.set_level(logging.WARNING)
    return records


def send_in_process(client, case: RestCase):
    headers = {"Accept": case.accept} if case.accept else {}
    if case.encoding == "query":
        return client.get("/conversation?" + form_bytes(case.params).decode(), headers=headers)
    body, kind = {"json": (json_bytes(case.params), "application/json"),
                  "form": (form_bytes(case.params), "application/x-www-form-urlencoded"),
                  "raw": (case.raw, "application/json")}[case.encoding]
    return client.post("/conversation", data=body, content_type=kind, headers=headers)


def seeded(name: str, seeds):
    """``@example`` for each seed: what issue 14 found is tried on every run."""
    def decorate(test):
        for seed in seeds:
            test = example(**{name: seed})(test)
        return test
    return decorate


@small_run(200)  # in-process requests are cheap
@seeded("case", REST_SEEDS)
@given(case=rest_cases())
def test_rest_never_answers_a_5xx_or_a_traceback(client, errors_logged, case):
    answer = send_in_process(client, case)
    assert not rest_problem(answer.status_code, answer.get_data(as_text=True), case)
    assert not errors_logged()
    assert client.get("/health").status_code == 200


@small_run(80)
@seeded("message", UI_SEEDS)
@given(message=ui_messages())
def test_the_ui_socket_answers_every_message_and_its_conversation_still_renders(
        app, errors_logged, message):
    runtime = app.extensions["tanglebox"]
    conversation = new_conversation("fuzz", PAGE, runtime.settings)
    ws = RecordingSocket()
    with app.test_request_context("/ws/chat"):
        chat = ChatSocket(ws, runtime, conversation, "fuzz")
        chat.handle(message)
        chat.handle(UI_PROBE)
        reconnect = ChatSocket(RecordingSocket(), runtime, conversation, "fuzz")
        for fragment in reconnect._sync():  # what a reconnecting page is sent
            fragment.encode("utf-8")
    assert "fuzz-probe" in ws.sent[-1]  # the probe after it was answered: the socket went on
    assert not socket_problem(ws.sent, message)
    assert not errors_logged()


@small_run(80)
@given(message=original_messages())
def test_the_original_socket_answers_every_message_then_a_ping(app, errors_logged, message):
    runtime = app.extensions["tanglebox"]
    ws = RecordingSocket([message, PING])
    with app.test_request_context("/"):
        serve(ws, runtime, client_id="fuzz", authenticated=True)
    assert PONG in ws.sent  # the probe was answered: the socket went on
    assert not socket_problem(ws.sent, message)
    assert not errors_logged()


@pytest.mark.parametrize("settings_values", [{"temperature": 0, "maxNewTokens": 8}])
@given(case=st.tuples(st.sampled_from(OPENAI_PATHS), openai_bodies))
@small_run(200)
@example(case=("/v1/chat/completions", OPENAI_SEEDS[0]))
@example(case=("/v1/chat/completions", OPENAI_SEEDS[1]))
@example(case=("/v1/completions", OPENAI_SEEDS[2]))
@example(case=("/v1/embeddings", OPENAI_SEEDS[3]))
def test_the_openai_api_answers_any_body_without_5xx_in_openai_shape(client, errors_logged,
                                                                      case):
    path, body = case
    with client.post(path, data=json_bytes(body), content_type="application/json") as response:
        text = response.get_data(as_text=True)
    assert not openai_problem(response.status_code, text, body)
    assert not errors_logged()

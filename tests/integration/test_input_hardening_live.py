"""Input that once got a 500 (issue 14, class 4), over the real stack (gunicorn + gevent, the
fake backend): a malformed chunked body, and chat UI socket messages with a lone surrogate or
nested 100,000 deep, which wrote an HTTP 500 into the upgraded socket and broke every reconnect
of a conversation that held such a turn. The same input in-process: tests/unit/
test_client_input.py.

Then a small fuzz run over the wire (bench/fuzz.py's strategies): what the in-process run
(tests/unit/test_fuzz.py) cannot reach, chunked bodies whose framing may be broken, and both
sockets' frames. The rule: no 5xx, no traceback, every probe answered within
bench.fuzz.DEADLINE, ``/health`` fine after each case.
"""

from __future__ import annotations

import json
import socket
from contextlib import closing

import pytest
import requests
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz import (DEADLINE, RestCase, original_messages, parameters, rest_problem,
                        send_original, send_rest, send_ui, socket_problem, ui_messages, ws_url)
from tests.live_server import LiveServer

RECEIVE_DEADLINE = 15  # seconds any single answer may take before the test fails


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("hardening"))
    live.start(fake={})
    yield live
    live.stop()


def raw_request(server, head: bytes, body: bytes) -> bytes:
    """Send bytes as they are (requests would frame a chunked body itself); the whole answer."""
    with closing(socket.create_connection(("127.0.0.1", server.port),
                                          timeout=RECEIVE_DEADLINE)) as sock:
        sock.sendall(head + body)  # not half-closed: the server takes that as the client gone
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


CHUNKED_HEAD = (b"POST /conversation HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
                b"Connection: close\r\n\r\n")


@pytest.mark.parametrize("body", [
    b"zz\r\n{}\r\n0\r\n\r\n",  # a chunk size that is not hex
    b"5\r\n{}\r\n0\r\n\r\n",  # a chunk longer than its size: no CRLF where it must be
    b"-1\r\n{}\r\n0\r\n\r\n",
])
def test_a_malformed_chunked_body_is_a_400(server, body):
    answer = raw_request(server, CHUNKED_HEAD, body)
    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 400"), answer[:300]
    assert b"Traceback" not in answer and b"500" not in status_line
    assert requests.get(server.url + "/health", timeout=RECEIVE_DEADLINE).status_code == 200


def test_a_well_formed_chunked_body_is_still_read(server):
    payload = json.dumps({"userPrompt": "echo chunked"}).encode()
    body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(payload), payload)
    answer = raw_request(server, CHUNKED_HEAD, body)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"chunked")


def open_chat(server, conversation: str) -> tuple[websocket.WebSocket, str]:
    ws = websocket.create_connection(f"{server.ws_url}/ws/chat?conversation={conversation}",
                                     timeout=RECEIVE_DEADLINE,  # as one browser (its cookie)
                                     cookie="tanglebox_browser=" + "h" * 43)
    return ws, ws.recv()


def ask(ws: websocket.WebSocket, prompt: str) -> str:
    """Send a prompt; the last fragment (the final reply)."""
    ws.send(json.dumps({"userPrompt": prompt}))
    while True:
        message = ws.recv()
        if 'aria-busy="true"' not in message and "turn-" in message:
            return message


@pytest.mark.parametrize("raw, named", [
    ('{"userPrompt": "echo \\ud800"}', "userPrompt"),
    ('{"action": "settings", "temperature": "0.5", "maxNewTokens": "10", '
     '"systemPrompt": "\\udfff"}', "systemPrompt"),
    ("[" * 100_000, "message"),
    ('{"userPrompt": ' + "[" * 100_000, "message"),
])
def test_an_unreadable_ui_message_is_an_error_fragment_and_the_socket_stays(server, raw, named):
    conversation = f"hardening-{abs(hash(raw))}"
    ws, _ = open_chat(server, conversation)
    with closing(ws):
        ws.send(raw)
        answer = ws.recv()
        assert 'id="chat-error"' in answer and "could not read that message" in answer
        assert f"({named}" in answer
        assert "HTTP/1.1" not in answer and "Internal Server Error" not in answer
        assert "still here" in ask(ws, "echo still here")  # the same socket goes on
    ws, sync = open_chat(server, conversation)  # and a reconnect finds the conversation
    with closing(ws):
        assert "still here" in sync and "\\ud800" not in sync


# -- a small fuzz run ---------------------------------------------------------------------------

SMALL_RUN = settings(max_examples=25, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))


def assert_healthy(server) -> None:
    assert requests.get(server.url + "/health", timeout=DEADLINE).status_code == 200
    assert "Traceback" not in server.log()


@SMALL_RUN
@given(case=st.builds(RestCase, st.just("chunked"), parameters, st.binary(max_size=9)))
def test_chunked_bodies_never_get_a_5xx(server, case):
    status, body = send_rest(server.url, case)
    assert not rest_problem(status, body, case)
    assert_healthy(server)


@SMALL_RUN
@given(message=ui_messages())
def test_the_ui_socket_answers_every_message_over_the_wire(server, message):
    with closing(websocket.create_connection(ws_url(server.url, "/ws/chat"),
                                             timeout=DEADLINE)) as ws:
        ws.recv()  # the sync
        seen = send_ui(ws, message)
    assert not socket_problem(seen, message)
    assert_healthy(server)


@SMALL_RUN
@given(message=original_messages())
def test_the_original_socket_answers_every_message_over_the_wire(server, message):
    with closing(websocket.create_connection(ws_url(server.url, "/"), timeout=DEADLINE)) as ws:
        seen = send_original(ws, message)
    assert not socket_problem(seen, message)
    assert_healthy(server)

"""The original websocket protocol at ``/``, driven by a real websocket client against a live
server (gunicorn + gevent), on the fake backend; one conversation with the real model.

The fake "model" answers ``echo X`` with X, ``count N`` with "1 2 … N", one byte per token, so
a streamed reply arrives as one message per character of ASCII text.
"""

from __future__ import annotations

import struct
from contextlib import closing

import pytest
import websocket
from websocket import ABNF

from tests.live_server import LiveServer, wait_until, wait_until_idle

ACK, FIN, SET, PONG, DELETED = "#a-c-k#", "#f-i-n#", "#-set-#", "#-pong-#", "#-delete-#"
RECEIVE_DEADLINE = 15  # seconds any single message may take before the test fails
ALLOWED_ORIGIN = "https://chat.example.com"
TOKEN = "tbx_original-socket-test-token"
LIMIT = 1000  # maxNewTokensLimit of the shared server


# -- helpers ---------------------------------------------------------------------------------

def connect(server: LiveServer, query: str = "", **options) -> websocket.WebSocket:
    return websocket.create_connection(f"{server.ws_url}/{query}", timeout=RECEIVE_DEADLINE,
                                       **options)


def receive(ws: websocket.WebSocket, count: int) -> list[str]:
    return [ws.recv() for _ in range(count)]


def receive_reply(ws: websocket.WebSocket) -> list[str]:
    """Every message up to and including ``#f-i-n#``."""
    messages = []
    while not messages or messages[-1] != FIN:
        messages.append(ws.recv())
    return messages


def ask(ws: websocket.WebSocket, prompt: str) -> list[str]:
    ws.send(prompt)
    return receive_reply(ws)


def messages_until_close(ws: websocket.WebSocket) -> tuple[list[str], int]:
    """The text messages the server still sends, then the code of its close frame."""
    messages = []
    while True:
        opcode, frame = ws.recv_data_frame(control_frame=True)
        if opcode == ABNF.OPCODE_CLOSE:
            return messages, struct.unpack("!H", frame.data[:2])[0]
        if opcode == ABNF.OPCODE_TEXT:
            messages.append(frame.data.decode())


def config(ws: websocket.WebSocket) -> list[str]:
    ws.send("#-get-config-#")
    return receive(ws, 4)


def handshake_status(server: LiveServer, query: str = "", **options) -> int:
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        connect(server, query, **options)
    return refused.value.status_code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the tests that do not need special settings."""
    live = LiveServer(tmp_path_factory.mktemp("original-socket"))
    live.start(fake={"step_delay": 0.01}, maxNewTokensLimit=LIMIT, maxNewTokens=100,
               temperature=0.7, allowedOrigins=[ALLOWED_ORIGIN])
    yield live
    live.stop()


@pytest.fixture
def ws(server):
    with closing(connect(server)) as socket_:
        yield socket_


# -- control messages ----------------------------------------------------------------------

def test_ping_is_answered_with_pong(ws):
    ws.send("#-ping-#")
    assert ws.recv() == PONG


def test_get_config_answers_four_messages_in_order(ws):
    assert config(ws) == ["#-model-name-#fake-model", "#-device-name-#cpu",
                          "#-max-new-tokens-#100", "#-temperature-#0.7"]


def test_settings_are_acknowledged_and_reflected_in_config(ws):
    ws.send("#-set-temp-#0.3")
    ws.send("#-set-max-tokens-#42")
    ws.send("#-set-streaming-#false")
    assert receive(ws, 3) == [SET, SET, SET]
    assert config(ws)[2:] == ["#-max-new-tokens-#42", "#-temperature-#0.3"]


def test_settings_belong_to_one_socket(server, ws):
    ws.send("#-set-temp-#0.1")
    ws.send("#-set-max-tokens-#7")
    assert receive(ws, 2) == [SET, SET]
    with closing(connect(server)) as other:
        assert config(other)[2:] == ["#-max-new-tokens-#100", "#-temperature-#0.7"]


@pytest.mark.parametrize("message", [
    "#-set-temp-#hot", "#-set-temp-#2.5", "#-set-temp-#-0.1", "#-set-temp-#nan",
    "#-set-temp-#inf", "#-set-temp-#",
    "#-set-max-tokens-#-5", "#-set-max-tokens-#0", "#-set-max-tokens-#1.5",
    "#-set-max-tokens-#ten", f"#-set-max-tokens-#{LIMIT + 1}", "#-set-max-tokens-#",
    "#-set-streaming-#yes", "#-set-streaming-#",
])
def test_a_bad_value_gets_one_error_and_changes_nothing(ws, message):
    token = message[:message.index("#", 2) + 1]
    ws.send(message)
    ws.send("#-ping-#")  # the pong right after the error proves there was only one message
    error, pong = receive(ws, 2)
    assert error.startswith("Error: ")
    assert f"send {token}" in error  # says what to send instead
    assert pong == PONG
    assert config(ws)[2:] == ["#-max-new-tokens-#100", "#-temperature-#0.7"]
    assert ask(ws, "echo hi") == [ACK, "h", "i", FIN]  # still streaming, still connected


def test_max_tokens_above_the_limit_names_the_limit(ws):
    ws.send(f"#-set-max-tokens-#{LIMIT + 1}")
    assert f"1 to {LIMIT}" in ws.recv()


# -- prompts ---------------------------------------------------------------------------------

def test_a_prompt_streams_one_message_per_token_by_default(ws):
    assert ask(ws, "echo hello world") == [ACK, *"hello world", FIN]


def test_without_streaming_the_reply_is_one_message(ws):
    ws.send("#-set-streaming-#false")
    assert ws.recv() == SET
    assert ask(ws, "echo hello world") == [ACK, "hello world", FIN]


def test_streaming_can_be_turned_back_on(ws):
    ws.send("#-set-streaming-#false")
    ws.send("#-set-streaming-#TRUE")
    assert receive(ws, 2) == [SET, SET]
    assert ask(ws, "count 3") == [ACK, "1", " ", "2", " ", "3", FIN]


def test_streamed_unicode_arrives_whole(ws):
    reply = ask(ws, "echo héllo wörld 🌍 ok")
    assert reply[0] == ACK and reply[-1] == FIN
    assert "".join(reply[1:-1]) == "héllo wörld 🌍 ok"
    assert not any("\ufffd" in part for part in reply)


def test_max_new_tokens_of_the_socket_caps_the_reply(ws):
    ws.send("#-set-max-tokens-#5")
    ws.send("#-set-streaming-#false")
    assert receive(ws, 2) == [SET, SET]
    assert ask(ws, "count 20") == [ACK, "1 2 3", FIN]


def test_messages_sent_during_a_reply_are_answered_after_it_in_order(ws):
    ws.send("count 5")
    ws.send("#-ping-#")
    ws.send("#-get-config-#")
    assert receive(ws, 16) == [ACK, "1", " ", "2", " ", "3", " ", "4", " ", "5", FIN, PONG,
                               "#-model-name-#fake-model", "#-device-name-#cpu",
                               "#-max-new-tokens-#100", "#-temperature-#0.7"]


def test_an_empty_prompt_gets_an_error_between_ack_and_fin(ws):
    ack, error, fin = ask(ws, "   ")
    assert (ack, fin) == (ACK, FIN)
    assert error.startswith("Error: ") and "empty" in error


def test_a_binary_message_gets_one_error_and_the_socket_stays_open(ws):
    ws.send_binary(b"echo hi")
    ws.send("#-ping-#")
    error, pong = receive(ws, 2)
    assert error.startswith("Error: ") and "text" in error
    assert pong == PONG


def test_an_unknown_hash_message_is_a_prompt(ws):
    assert ask(ws, "#-set-colour-#red") == [ACK, *"You said: #-set-colour-#red", FIN]


# -- the conversation ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_context_server(tmp_path_factory):
    """Context of 150 tokens: one 68-token turn fits, the same turn with its history does not."""
    live = LiveServer(tmp_path_factory.mktemp("original-socket-context"))
    live.start(fake={"context_length": 150})
    yield live
    live.stop()


LONG_TURN = "echo " + "a" * 60  # 68 prompt tokens; with the first turn as history, 197


def test_the_socket_keeps_its_conversation_until_delete(small_context_server):
    with closing(connect(small_context_server)) as ws:
        ws.send("#-set-streaming-#false")
        assert ws.recv() == SET
        assert ask(ws, LONG_TURN) == [ACK, "a" * 60, FIN]
        # The second turn is sent with the first as history, which no longer fits.
        ack, error, fin = ask(ws, LONG_TURN)
        assert (ack, fin) == (ACK, FIN)
        assert error.startswith("Error: The prompt is 197 tokens")
        assert "#-delete-#" in error  # says how to go on
        ws.send("#-delete-#")
        assert ws.recv() == DELETED
        assert ask(ws, LONG_TURN) == [ACK, "a" * 60, FIN]


def test_each_socket_has_its_own_conversation(small_context_server):
    with closing(connect(small_context_server)) as first, \
            closing(connect(small_context_server)) as second:
        assert ask(first, LONG_TURN)[-1] == FIN
        assert "".join(ask(second, LONG_TURN)) == ACK + "a" * 60 + FIN


# -- service states --------------------------------------------------------------------------

def test_maintenance_mode_answers_prompts_with_the_maintenance_sentence(fake_server):
    fake_server.start(fake={}, maintenanceMode=True,
                      maintenanceMessage="Back at noon: new model going in.")
    with closing(connect(fake_server)) as ws:
        assert ask(ws, "echo hi") == [ACK, "Back at noon: new model going in.", FIN]
        ws.send("#-ping-#")
        assert ws.recv() == PONG


def test_a_full_queue_is_an_error_then_fin_at_once(fake_server):
    fake_server.start(fake={"step_delay": 0.05, "max_sequences": 1}, queueSize=0)
    with closing(connect(fake_server)) as busy, closing(connect(fake_server)) as late:
        busy.send("count 500")
        assert receive(busy, 2) == [ACK, "1"]  # its generation holds the only slot
        ack, error, fin = ask(late, "echo hi")
        assert (ack, fin) == (ACK, FIN)
        assert error.startswith("Error: ") and "busy" in error


def test_the_original_socket_is_not_served_when_the_api_is_off(fake_server):
    fake_server.start(fake={}, enableApi=False)
    assert handshake_status(fake_server) == 404


# -- clients that go away, stay silent or send too much -------------------------------------

@pytest.mark.parametrize("streaming", ["true", "false"])
def test_closing_the_socket_mid_reply_cancels_the_generation(fake_server, streaming):
    fake_server.start(fake={"step_delay": 0.05}, maxNewTokensLimit=4000)
    ws = connect(fake_server)
    ws.send("#-set-max-tokens-#4000")  # about 200 s of reply if nobody stopped it
    ws.send(f"#-set-streaming-#{streaming}")
    ws.send("count 2000")
    assert receive(ws, 3) == [SET, SET, ACK]
    # #a-c-k# goes out before the prompt reaches the engine (the original's order).
    wait_until(lambda: fake_server.health()["busy"] == 1, what="generation started")
    ws.close()
    wait_until_idle(fake_server)


def test_a_vanished_client_mid_stream_cancels_the_generation(fake_server):
    fake_server.start(fake={"step_delay": 0.05}, maxNewTokensLimit=4000)
    ws = connect(fake_server)
    ws.send("#-set-max-tokens-#4000")
    ws.send("count 2000")
    assert receive(ws, 3) == [SET, ACK, "1"]
    ws.shutdown()  # the TCP connection ends without a close frame
    wait_until_idle(fake_server)


def test_a_client_that_stops_reading_does_not_block_others(fake_server):
    fake_server.start(fake={"step_delay": 0.02}, maxNewTokensLimit=4000)
    with closing(connect(fake_server)) as slow, closing(connect(fake_server)) as other:
        slow.send("#-set-max-tokens-#4000")
        slow.send("count 2000")  # and never read what streams back
        assert receive(slow, 3) == [SET, ACK, "1"]
        other.send("#-ping-#")
        assert other.recv() == PONG
        assert ask(other, "echo still here") == [ACK, *"still here", FIN]


def test_an_idle_socket_is_closed_but_not_during_a_reply(fake_server):
    fake_server.start(fake={"step_delay": 0.05}, socketIdleTimeoutSeconds=1)
    with closing(connect(fake_server)) as silent:
        assert messages_until_close(silent) == ([], 1000)
    with closing(connect(fake_server)) as busy:
        # About 4 s of reply, longer than the idle timeout: the reply still completes.
        reply = ask(busy, "count 30")
        assert "".join(reply[1:-1]) == " ".join(str(i) for i in range(1, 31))
        assert messages_until_close(busy) == ([], 1000)


def test_a_message_over_max_request_bytes_closes_with_1009(fake_server):
    fake_server.start(fake={}, maxRequestBytes=1024, maxNewTokens=1000)
    with closing(connect(fake_server)) as ws:
        ws.send("#-set-streaming-#false")
        assert ws.recv() == SET
        assert ask(ws, "echo " + "y" * 900) == [ACK, "y" * 900, FIN]  # under: served
        ws.send("echo " + "z" * 2000)
        assert messages_until_close(ws) == ([], 1009)
    with closing(connect(fake_server)) as next_client:  # the server is fine
        next_client.send("#-ping-#")
        assert next_client.recv() == PONG


# -- origin and tokens -----------------------------------------------------------------------

def test_a_foreign_origin_is_refused_before_the_upgrade(server):
    assert handshake_status(server, origin="https://evil.example") == 403


@pytest.mark.parametrize("origin", ["same", ALLOWED_ORIGIN, None])
def test_own_allowed_and_absent_origins_are_served(server, origin):
    options = ({"suppress_origin": True} if origin is None
               else {"origin": server.url if origin == "same" else origin})
    with closing(connect(server, **options)) as ws:
        ws.send("#-ping-#")
        assert ws.recv() == PONG


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("original-socket-tokens")
    (folder / "apiTokens.txt").write_text(f"format-of-file=username:TOKEN\ntester:{TOKEN}\n",
                                          encoding="utf-8")
    live = LiveServer(folder).start(fake={}, isApiTokensRequired=True)
    yield live
    live.stop()


def test_a_valid_query_token_opens_the_socket(token_server):
    with closing(connect(token_server, f"?token={TOKEN}")) as ws:
        assert ask(ws, "echo hi") == [ACK, "h", "i", FIN]


def test_a_valid_bearer_header_opens_the_socket(token_server):
    with closing(connect(token_server, header=[f"Authorization: Bearer {TOKEN}"])) as ws:
        assert ask(ws, "echo hi") == [ACK, "h", "i", FIN]


@pytest.mark.parametrize("query", ["?token=wrong", "?token="])
def test_a_wrong_query_token_is_refused_before_the_upgrade(token_server, query):
    assert handshake_status(token_server, query) == 401


def test_a_valid_first_token_message_opens_the_socket(token_server):
    with closing(connect(token_server)) as ws:
        ws.send(f"#-token-#{TOKEN}")
        assert ws.recv() == SET
        assert ask(ws, "echo hi") == [ACK, "h", "i", FIN]


@pytest.mark.parametrize("first", ["#-ping-#", "echo hi", "#-token-#wrong", "#-token-#",
                                   "#-get-config-#"])
def test_without_a_token_one_error_then_close(token_server, first):
    with closing(connect(token_server)) as ws:
        ws.send(first)
        ws.send(f"#-token-#{TOKEN}")  # too late: the first message decides
        messages, code = messages_until_close(ws)
    assert code == 1008
    assert len(messages) == 1 and messages[0].startswith("Error: ")
    assert "token" in messages[0] and "wrong" not in messages[0]


def test_missing_and_wrong_tokens_get_the_same_words(token_server):
    answers = []
    for first in ("#-ping-#", "#-token-#wrong"):
        with closing(connect(token_server)) as ws:
            ws.send(first)
            answers.append(messages_until_close(ws))
    assert answers[0] == answers[1]


# -- the real model --------------------------------------------------------------------------

@pytest.mark.real_model
def test_a_multi_turn_conversation_with_the_real_model(fake_server):
    fake_server.start(fake=None, temperature=0)
    with closing(connect(fake_server)) as ws:
        ws.send("#-set-max-tokens-#48")
        assert ws.recv() == SET
        first = ask(ws, "What is 2 + 2?")
        assert first[0] == ACK and first[-1] == FIN
        first_text = "".join(first[1:-1])
        assert "4" in first_text
        # Answerable only from the first turn, which the socket keeps.
        second = ask(ws, "Now add 3 to that number.")
        assert second[0] == ACK and second[-1] == FIN
        second_text = "".join(second[1:-1])
        assert second_text.strip() and not second_text.startswith("Error:")
        # A fresh conversation, not streamed: at temperature 0 the very same first answer.
        ws.send("#-delete-#")
        ws.send("#-set-streaming-#false")
        assert receive(ws, 2) == [DELETED, SET]
        assert ask(ws, "What is 2 + 2?") == [ACK, first_text, FIN]

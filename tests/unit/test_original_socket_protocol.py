"""The original socket's parsing and its protocol loop, driven in-process with a scripted socket.

The live-server tests (tests/integration/test_original_socket.py) cover the wire; these cover
what is awkward to reach from outside: the loading state, the shared validation rules, and a
client that vanishes exactly while a reply streams.
"""

from __future__ import annotations

import pytest
from simple_websocket import ConnectionClosed

from tanglebox.chat_request import RequestError, parse_max_new_tokens, parse_temperature
from tanglebox.generation import Done, FinishReason
from tanglebox.runtime import Runtime
from tanglebox.settings import load_settings
from tanglebox.web import original_socket
from tanglebox.web.original_socket import (
    ControlMessage,
    SocketState,
    apply_setting,
    parse_control,
    serve,
)
from tests.fake_backend import FakeBackend


class ScriptedSocket:
    """Stands in for simple-websocket's Server: plays ``incoming``, records what is sent.

    ``gone_after`` sends: the client then vanishes, either with a failing send (``"send"``)
    or as a socket the reader saw close (``"closed"``).
    """

    def __init__(self, incoming: list[str], gone_after: int | None = None,
                 how: str = "send") -> None:
        self.incoming = list(incoming)
        self.sent: list[str] = []
        self.connected = True
        self.close_reason = self.close_message = None
        self.gone_after = gone_after
        self.how = how

    def receive(self, timeout: float | None = None) -> str | None:
        if not self.connected:
            raise ConnectionClosed()
        return self.incoming.pop(0) if self.incoming else None  # None: the idle timeout

    def send(self, text: str) -> None:
        if not self.connected:
            raise ConnectionClosed()
        if self.gone_after is not None and len(self.sent) >= self.gone_after:
            if self.how == "send":
                raise BrokenPipeError(32, "Broken pipe")
            self.connected = False
            raise ConnectionClosed()
        self.sent.append(text)
        if self.how == "closed" and len(self.sent) == self.gone_after:
            self.connected = False

    def close(self, reason=None, message=None) -> None:
        self.connected = False
        self.close_reason, self.close_message = reason, message


@pytest.fixture
def fake_backend() -> FakeBackend:
    return FakeBackend(step_delay=0.01)  # a "count 500" reply takes seconds: time to vanish


@pytest.fixture
def runtime(app) -> Runtime:
    return app.extensions["tanglebox"]


# -- parsing ---------------------------------------------------------------------------------

@pytest.mark.parametrize("message, expected", [
    ("#-set-temp-#0.5", ControlMessage("#-set-temp-#", "0.5")),
    ("#-set-max-tokens-#12", ControlMessage("#-set-max-tokens-#", "12")),
    ("#-set-streaming-#false", ControlMessage("#-set-streaming-#", "false")),
    ("#-get-config-#", ControlMessage("#-get-config-#", "")),
    ("#-delete-#", ControlMessage("#-delete-#", "")),
    ("#-ping-#", ControlMessage("#-ping-#", "")),
    ("#-token-#abc", ControlMessage("#-token-#", "abc")),
    ("hello", None),
    ("what does #-ping-# mean?", None),  # a token inside a prompt is still a prompt
    ("#-set-colour-#red", None),
    ("", None),
])
def test_parse_control(message, expected):
    assert parse_control(message) == expected


def state() -> SocketState:
    return SocketState(temperature=0.7, max_new_tokens=100, max_new_tokens_limit=1000)


@pytest.mark.parametrize("value, rule", [
    ("nan", lambda: parse_temperature("nan", param="temperature")),
    ("3", lambda: parse_temperature("3", param="temperature")),
])
def test_a_bad_temperature_gets_the_same_rule_as_rest(value, rule):
    socket_state = state()
    with pytest.raises(RequestError) as socket_error:
        apply_setting(socket_state, ControlMessage("#-set-temp-#", value))
    with pytest.raises(RequestError) as shared_error:
        rule()
    assert str(socket_error.value) == str(shared_error.value)
    assert socket_state == state()


def test_max_new_tokens_above_the_limit_is_refused_like_rest():
    socket_state = state()
    with pytest.raises(RequestError) as socket_error:
        apply_setting(socket_state, ControlMessage("#-set-max-tokens-#", "1001"))
    with pytest.raises(RequestError) as shared_error:
        parse_max_new_tokens("1001", 1000, param="max new tokens")
    assert str(socket_error.value) == str(shared_error.value)
    assert socket_state.max_new_tokens == 100


def test_good_values_are_applied():
    socket_state = state()
    apply_setting(socket_state, ControlMessage("#-set-temp-#", " 0 "))
    apply_setting(socket_state, ControlMessage("#-set-max-tokens-#", "1000"))
    apply_setting(socket_state, ControlMessage("#-set-streaming-#", "False"))
    assert (socket_state.temperature, socket_state.max_new_tokens, socket_state.streaming) == (
        0.0, 1000, False)


# -- the protocol loop -----------------------------------------------------------------------

def test_while_the_model_loads_a_prompt_gets_the_loading_sentence(tmp_path):
    loading = Runtime(load_settings(tmp_path / "settings.json", {"modelName": "/models/x.gguf"}))
    ws = ScriptedSocket(["hello", "#-get-config-#"])
    serve(ws, loading, client_id="", authenticated=True)
    ack, sentence, fin, *config = ws.sent
    assert (ack, fin) == ("#a-c-k#", "#f-i-n#")
    assert "loading" in sentence and not sentence.startswith("Error")
    assert config[0] == "#-model-name-#/models/x.gguf"
    assert not ws.connected  # then closed for idleness: the script ran out


@pytest.mark.parametrize("how", ["send", "closed"])
def test_a_client_gone_mid_reply_cancels_its_generation(runtime, monkeypatch, how):
    submitted = []
    submit = runtime.engine.submit
    monkeypatch.setattr(runtime.engine, "submit",
                        lambda request: submitted.append(submit(request)) or submitted[-1])
    ws = ScriptedSocket(["count 500"], gone_after=3, how=how)  # ack, "1", " ", then gone
    with pytest.raises(ConnectionClosed):
        serve(ws, runtime, client_id="", authenticated=True)
    assert ws.sent == ["#a-c-k#", "1", " "]
    (generation,) = submitted
    assert generation.cancelled
    final = list(generation.events())[-1]
    assert isinstance(final, Done) and final.finish_reason == FinishReason.CANCELLED


def test_an_unauthenticated_socket_is_closed_after_one_error(runtime):
    ws = ScriptedSocket(["hello", "#-ping-#"])
    serve(ws, runtime, client_id="", authenticated=False)
    assert ws.sent == [original_socket.TOKEN_REQUIRED_MESSAGE]
    assert ws.close_reason == 1008

"""Unbounded websocket input (issue 14, class 3), against a live server: a client that sends
message after message of 1 MiB while its reply streams is closed with 1008 once a few wait
unanswered, the worker's memory does not grow with the flood (it grew by 320 MB on the original
socket before), and it is back near where it was after the close. Both sockets: the original
protocol's ``#-ping-#`` (answered only after the reply, so they wait while the client reads the
reply) and ``/ws/chat`` settings (answered as they come: they wait only when the server falls
behind, so there the socket is closed with 1008 or every message is answered; which one is a
race between its reader and its handler). ``BoundedInbox`` itself: tests/unit/test_socket_inbox.py."""

from __future__ import annotations

import json
import socket
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from tests.integration.test_concurrency import (ENDLESS, ENDLESS_FAKE, ENDLESS_SETTINGS,
                                                RECEIVE_DEADLINE, original_socket,
                                                process_status, worker_pid)
from tests.live_server import wait_until, wait_until_idle

MIB = 1 << 20
MAX_REQUEST_BYTES = MIB
FLOOD = 300  # messages of ~1 MiB: 300 MB held by the worker before the fix
GROWTH_LIMIT_KB = 100 * 1024  # the inbox holds a few MiB; anything like the flood fails
RETURN_MARGIN_KB = 50 * 1024


SETTINGS_ANSWER = "pplied"  # "Applied to this conversation." or "Not applied: ..."
ANSWERED = "every message answered"


def ping_message() -> str:
    return "#-ping-#" + "x" * (MAX_REQUEST_BYTES - 100)


def settings_message() -> str:
    return json.dumps({"action": "settings", "temperature": "0.5",
                       "padding": "x" * (MAX_REQUEST_BYTES - 100)})


class DeflateClient:
    """A raw websocket client with permessage-deflate (wsproto's client side), as browsers and
    most libraries connect: a 1 MiB message of one letter is about 1 kB on the wire, so a
    flood arrives far faster than the server answers it."""

    def __init__(self, server, path: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port),
                                             timeout=RECEIVE_DEADLINE)
        self.conn = WSConnection(ConnectionType.CLIENT)
        self.sock.sendall(self.conn.send(Request(
            host=f"127.0.0.1:{server.port}", target=path,
            extensions=[PerMessageDeflate(client_no_context_takeover=True,
                                          server_no_context_takeover=True)])))
        assert any(isinstance(e, AcceptConnection) for e in self._events()), "not upgraded"

    def _events(self) -> list:
        """The events in the next bytes from the server; [] once it has closed."""
        data = self.sock.recv(65536)
        if not data:
            return []
        self.conn.receive_data(data)
        return list(self.conn.events())

    def flood(self, message: str) -> int:
        """Send FLOOD copies of ``message``, reading nothing; how many went out before the
        server closed the connection. (With no context takeover every copy compresses to
        the same frame.)"""
        frame = self.conn.send(TextMessage(data=message))
        sent = 0
        try:
            for _ in range(FLOOD):
                self.sock.sendall(frame)
                sent += 1
        except OSError:
            pass  # the server closed the socket: what the test wants
        return sent

    def read_until_closed(self, deadline: float, answers: int | None = None) -> int | str | None:
        """Read (and drop) what the server sends, up to its close frame: its code; ANSWERED
        once ``answers`` settings answers came instead (None: not counted); None when the
        connection ends without either or ``deadline`` (monotonic) passes."""
        answered = 0
        try:
            while time.monotonic() < deadline and (events := self._events()):
                for event in events:
                    if isinstance(event, CloseConnection):
                        return event.code
                    if isinstance(event, TextMessage) and SETTINGS_ANSWER in event.data:
                        answered += 1
                        if answered == answers:
                            return ANSWERED
        except OSError:
            pass
        return None

    def send(self, message: str) -> None:
        self.sock.sendall(self.conn.send(TextMessage(data=message)))

    def close(self) -> None:
        self.sock.close()


def rss_kb(server) -> int:
    return process_status(worker_pid(server))["rss_kb"]


def peak_rss_kb(server) -> int:
    """The worker's largest resident memory so far (VmHWM)."""
    status = Path(f"/proc/{worker_pid(server)}/status").read_text()
    return int(next(line for line in status.splitlines()
                    if line.startswith("VmHWM:")).split()[1])


@pytest.mark.parametrize("path, prompt, message, reads_during_flood", [
    ("/", ENDLESS, ping_message, True),
    ("/ws/chat", json.dumps({"userPrompt": ENDLESS}), settings_message, False),
], ids=["original-ping", "ui-settings"])
def test_a_flood_while_a_reply_streams_is_closed_with_1008_and_memory_returns(
        fake_server, path, prompt, message, reads_during_flood):
    # finishRepliesWithoutWatchers false: the chat UI's closed socket cancels its reply too.
    server = fake_server.start(fake=ENDLESS_FAKE, maxRequestBytes=MAX_REQUEST_BYTES,
                               finishRepliesWithoutWatchers=False, **ENDLESS_SETTINGS)
    client = DeflateClient(server, path)
    baseline = rss_kb(server)
    client.send(prompt)  # a reply that outlasts the test: the server answers nothing else
    wait_until(lambda: server.health()["busy"] == 1, RECEIVE_DEADLINE, "the reply running")

    codes: list[int | str | None] = []
    deadline = time.monotonic() + RECEIVE_DEADLINE
    if reads_during_flood:
        reader = threading.Thread(target=lambda: codes.append(
            client.read_until_closed(deadline)), daemon=True)
        reader.start()
        sent = client.flood(message())
    else:
        sent = client.flood(message())
        reader = threading.Thread(target=lambda: codes.append(
            client.read_until_closed(deadline, answers=sent)), daemon=True)
        reader.start()
    reader.join(RECEIVE_DEADLINE * 2)
    grown = peak_rss_kb(server) - baseline
    client.close()

    assert grown < GROWTH_LIMIT_KB, f"the worker grew by {grown} kB during the flood"
    if reads_during_flood:
        assert codes == [1008], (codes, sent)
    else:  # the socket closes once messages wait, or it kept up and answered every one
        assert codes in ([1008], [ANSWERED]), (codes, sent)
    wait_until(lambda: rss_kb(server) - baseline < RETURN_MARGIN_KB, RECEIVE_DEADLINE,
               "the worker's memory back near its baseline after the close")
    wait_until_idle(server)  # the closed socket's reply was cancelled
    with closing(original_socket(server)) as ws:  # the server is fine for everyone else
        ws.send("#-ping-#")
        assert ws.recv() == "#-pong-#"

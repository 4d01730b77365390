"""Large messages reach a slow reader whole, against a live server.

Under gevent a socket's ``send()`` writes what the kernel has room for and returns the count;
simple-websocket 1.1.0 sends each frame with one ``send()`` and ignores the count
(miguelgrinberg/simple-websocket#45), so a frame larger than the room left (a long conversation
shown again on reconnect, to a phone on a slow link) reached the client cut short, and every
frame after it was garbage: the browser closes such a socket ("Invalid frame header"). The
client here has a 4 kB receive buffer and 536-byte segments, so the server's room (its send
buffer grows with the segment size) runs out at once.
"""

from __future__ import annotations

import json
import random
import socket
import string
from contextlib import closing

import websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, Message, Ping, RejectConnection, Request,
                            TextMessage)
from wsproto.extensions import PerMessageDeflate

from tests.integration.test_concurrency import RECEIVE_DEADLINE
from tests.integration.test_concurrency import _composer_enabled as composer_enabled

LONG_PROMPT = "echo " + "a long line of the person's message; " * 4000  # ~150 kB
# A small receive buffer and segment size: the server's send buffer starts small too.
SMALL_BUFFER = ((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),
                (socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536))


def test_a_frame_larger_than_the_room_left_reaches_a_slow_reader_whole(fake_server):
    server = fake_server.start()
    with closing(websocket.create_connection(server.ws_url + "/ws/chat?surface=page",
                                             timeout=RECEIVE_DEADLINE,
                                             sockopt=SMALL_BUFFER)) as ws:
        ws.recv()  # the sync
        ws.send(json.dumps({"userPrompt": LONG_PROMPT, "HEADERS": {"HX-Request": "true"}}))
        # The person's message comes back as one frame of over 150 kB; then the reply
        # streams and the composer is enabled again: every frame must still decode.
        frames = [ws.recv()]
        while not composer_enabled(frames[-1]):
            frames.append(ws.recv())
    person = next(f for f in frames if "a long line of the person" in f)
    assert person.count("a long line of the person's message;") == 4000


class DeflatingClient:
    """A websocket client that offers permessage-deflate as browsers do, on wsproto, counting
    the bytes the server put on the wire and the text they carried."""

    def __init__(self, server, path: str, deflate: PerMessageDeflate) -> None:
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=RECEIVE_DEADLINE)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.wire_bytes = self.text_bytes = 0
        self.extensions: list[str] | None = None
        self._texts: list[str] = []
        self._partial = ""
        self.sock.sendall(self.ws.send(Request(
            host=f"127.0.0.1:{server.port}", target=path, extensions=[deflate],
            extra_headers=[(b"Origin", server.url.encode())])))
        while self.extensions is None:
            self._read()

    def send(self, text: str) -> None:
        self.sock.sendall(self.ws.send(Message(data=text)))

    def recv(self) -> str:
        while not self._texts:
            self._read()
        return self._texts.pop(0)

    def close(self) -> None:
        self.sock.close()

    def _read(self) -> None:
        data = self.sock.recv(65536)
        assert data, "the server closed the connection"
        self.wire_bytes += len(data)
        self.ws.receive_data(data)
        for event in self.ws.events():
            if isinstance(event, AcceptConnection):
                self.extensions = [extension.name for extension in event.extensions]
            elif isinstance(event, RejectConnection):
                raise AssertionError(f"the handshake was refused: {event.status_code}")
            elif isinstance(event, Ping):
                self.sock.sendall(self.ws.send(event.response()))
            elif isinstance(event, TextMessage):
                self._partial += event.data
                if event.message_finished:
                    self.text_bytes += len(self._partial.encode("utf-8"))
                    self._texts.append(self._partial)
                    self._partial = ""


# Words of random letters: text a compressor cannot shrink much by itself, so what it saves
# is the paragraph sent again at each update.
_letters = random.Random(7)
ECHOED = " ".join("".join(_letters.choice(string.ascii_lowercase)
                          for _ in range(_letters.randint(2, 9))) for _ in range(80)) + "."


def _stream_a_reply(server, deflate: PerMessageDeflate) -> DeflatingClient:
    client = DeflatingClient(server, "/ws/chat?surface=page", deflate)
    try:
        assert client.extensions == ["permessage-deflate"]
        client.recv()  # the sync
        client.send(json.dumps({"userPrompt": "echo " + ECHOED, "HEADERS": {"HX-Request": "true"}}))
        frames = [client.recv()]
        while not composer_enabled(frames[-1]):
            frames.append(client.recv())
    finally:
        client.close()
    assert len(frames) > 10  # the reply streamed in many updates
    assert ECHOED[:40] in frames[-2] + frames[-1]  # the reply, ended
    return client


def test_the_chat_socket_compresses_what_it_sends_for_a_client_that_offers_deflate(
        fake_server):
    """Browsers offer permessage-deflate; the chat socket accepts it and keeps the compressor's
    window between messages, so the open block sent again at each update travels as a few
    bytes of back-references (bench.ui_deltas measures a 2,000-token reply)."""
    server = fake_server.start(fake={"step_delay": 0.01})  # a reply of a second or more
    kept = _stream_a_reply(server, PerMessageDeflate())
    # The same reply, the client asking the server to start each message's window afresh:
    # only what one message repeats within itself is saved.
    fresh = _stream_a_reply(server, PerMessageDeflate(server_no_context_takeover=True))
    assert kept.wire_bytes < kept.text_bytes / 4
    assert kept.wire_bytes < fresh.wire_bytes / 2

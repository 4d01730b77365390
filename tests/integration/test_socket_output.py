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
import socket
from contextlib import closing

import websocket

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

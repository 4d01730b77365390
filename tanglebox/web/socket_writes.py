"""Whole frames on a websocket, however slow the client reads.

Under gevent a socket's ``send()`` writes what the kernel has room for and returns the count.
simple-websocket 1.1.0 (the newest) sends each frame with one ``send()`` and ignores the count
(miguelgrinberg/simple-websocket#45), so a frame larger than the room left reached a slow
client cut short, and every frame after it was garbage: a long conversation shown again on
reconnect, to a phone on a slow link, closed the socket with "Invalid frame header".
:func:`write_whole_frames` gives the socket's ``send()`` the meaning simple-websocket expects:
all of it, one frame at a time. The lock keeps frames whole when two greenlets write (the
handler's reply and the reader's pong or close answer): a write that waits for room lets the
other greenlet run, and its frame must not land inside this one.
"""

from __future__ import annotations

import threading
from typing import Any

from simple_websocket import Server


class WholeFrameSocket:
    """A socket whose ``send()`` writes everything it is given, one caller at a time."""

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._lock = threading.Lock()  # gevent's under gevent (threading is patched)

    def send(self, data: bytes, flags: int = 0) -> int:
        with self._lock:
            self._sock.sendall(data, flags)
        return len(data)

    def __getattr__(self, name: str) -> Any:  # recv, close, fileno...: the socket's own
        return getattr(self._sock, name)


def write_whole_frames(ws: Server) -> None:
    """Make ``ws`` send whole frames (see the module). Call first thing in the handler."""
    if not isinstance(ws.sock, WholeFrameSocket):
        ws.sock = WholeFrameSocket(ws.sock)

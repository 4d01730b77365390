"""A bounded inbox for a websocket: what a client may send ahead of the server's answers.

simple-websocket reads a socket on a greenlet of its own and appends every message to the
socket's ``input_buffer``, a plain list, however far the handler is behind. A client that
sends and never reads stalls the handler on its first answer (the send waits for the client),
while the reader goes on appending: issue 14 grew a worker by 1 GB with 1,000 messages of 1 MiB
on the original socket. :func:`bound_inbox` puts a list in its place that holds at most
``max_messages`` messages and ``max_bytes`` bytes; the message past either closes the socket
with 1008 (policy violation) and is dropped, so the reader stops reading and the memory a
socket can hold is fixed. (One message over ``maxRequestBytes`` closes with 1009 before it is
kept: simple-websocket's ``max_message_size``.)

Closing waits for the client's answering close frame (:func:`close`, and on leaving
:func:`bounded_inbox` after an overflow): returning at once would close the TCP connection with
the client's messages still unread, and the kernel answers that with a reset, which can destroy
the close frame (and the error message before it) on the client's side.

Both sockets answer in order, one message at a time, so an honest client has few messages
waiting: a chat UI's Stop and settings during a reply, a script's prompts sent ahead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from simple_websocket import Server
from wsproto.frame_protocol import CloseReason

# Messages a client may send ahead of the answers; far more than a person or an orderly
# script sends while a reply streams.
MAX_MESSAGES = 32
TOO_MANY = "too many messages waiting for an answer"
# How long a close the server starts waits for the client's answering close frame.
CLOSE_HANDSHAKE_SECONDS = 2.0


class BoundedInbox(list):
    """simple-websocket's ``input_buffer`` with a limit (see the module)."""

    def __init__(self, ws: Server, max_messages: int, max_bytes: int) -> None:
        super().__init__()
        self.ws = ws
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.bytes = 0
        self.overflowed = False

    def append(self, message: Any) -> None:  # the reader's side
        size = len(message)
        if self.overflowed:
            return
        if len(self) >= self.max_messages or self.bytes + size > self.max_bytes:
            self.overflowed = True
            try:
                self.ws.close(CloseReason.POLICY_VIOLATION, TOO_MANY)
            except Exception:  # noqa: BLE001 - already closing: the message is dropped all the same
                pass
            return
        self.bytes += size
        super().append(message)

    def pop(self, index: int = -1) -> Any:  # the handler's side (receive)
        message = super().pop(index)
        self.bytes -= len(message)
        return message


@contextmanager
def bounded_inbox(ws: Server, max_message_bytes: int,
                  max_messages: int = MAX_MESSAGES) -> Iterator[BoundedInbox]:
    """Give ``ws`` a bounded inbox for the handler's lifetime: ``max_messages`` messages, and
    bytes for four of the largest allowed (``max_message_bytes``). Enter first thing in the
    handler; after an overflow, leaving waits for the client's answer to the 1008 close."""
    inbox = BoundedInbox(ws, max_messages, 4 * max_message_bytes)
    # The reader greenlet may already have kept a message; no switch happens between the
    # copy and the swap (gevent switches only on I/O), so none is lost.
    for message in ws.input_buffer:
        inbox.append(message)
    ws.input_buffer = inbox
    try:
        yield inbox
    finally:
        if inbox.overflowed:
            await_close_answer(ws)


def close(ws: Server, code: int, reason: str) -> None:
    """Close the socket with ``code``, then wait briefly for the client's answering close."""
    ws.close(code, reason)
    await_close_answer(ws)


def await_close_answer(ws: Server) -> None:
    """Wait (at most CLOSE_HANDSHAKE_SECONDS) for simple-websocket's reader to end: it ends on
    the client's answering close frame, or when the connection drops."""
    reader = getattr(ws, "thread", None)
    if reader is not None:
        reader.join(CLOSE_HANDSHAKE_SECONDS)

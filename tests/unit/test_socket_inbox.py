"""The bounded inbox of a websocket (``tanglebox.web.socket_inbox``): what a client may send
ahead of the answers is held up to a count and a size; the message past either closes the
socket with 1008 once and is dropped, as is everything after it."""

from __future__ import annotations

from wsproto.frame_protocol import CloseReason

from tanglebox.web.socket_inbox import TOO_MANY, BoundedInbox


class RecordingSocket:
    def __init__(self) -> None:
        self.closes: list[tuple[int, str]] = []

    def close(self, reason: int, message: str) -> None:
        self.closes.append((reason, message))


def test_the_message_past_the_count_closes_with_1008_and_is_dropped():
    ws = RecordingSocket()
    inbox = BoundedInbox(ws, max_messages=3, max_bytes=1000)
    for message in ("a", "b", "c", "d", "e"):
        inbox.append(message)
    assert list(inbox) == ["a", "b", "c"]
    assert ws.closes == [(CloseReason.POLICY_VIOLATION, TOO_MANY)]


def test_the_message_past_the_size_closes_with_1008_and_is_dropped():
    ws = RecordingSocket()
    inbox = BoundedInbox(ws, max_messages=10, max_bytes=10)
    inbox.append("x" * 6)
    inbox.append("y" * 5)
    inbox.append("z")
    assert list(inbox) == ["x" * 6] and inbox.overflowed
    assert ws.closes == [(CloseReason.POLICY_VIOLATION, TOO_MANY)]


def test_answered_messages_make_room_again():
    ws = RecordingSocket()
    inbox = BoundedInbox(ws, max_messages=2, max_bytes=10)
    for _ in range(20):  # a client that sends, waits for the answer, sends again
        inbox.append("x" * 5)
        inbox.append("y" * 5)
        assert inbox.pop(0) == "x" * 5 and inbox.pop(0) == "y" * 5
    assert inbox.bytes == 0 and not ws.closes

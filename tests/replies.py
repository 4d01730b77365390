"""Read a generation to its end: the text streamed in deltas, and the final event."""

from __future__ import annotations

from tanglebox.engine import Delta, Done, Error


def collect_reply(generation) -> tuple[str, Done | Error]:
    """Deltas until one Done or Error, which ends the generation; anything else fails the test."""
    streamed = ""
    for event in generation.events():
        if isinstance(event, Delta):
            streamed += event.text
        else:
            assert isinstance(event, (Done, Error)), event
            return streamed, event
    raise AssertionError("no final event")

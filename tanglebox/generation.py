"""One reply as an adapter sees it: the events it reads, and how a reply can end.

The engine answers every submitted request with a :class:`Generation`; its events are::

    Delta(text)*  then  Done(finish_reason, text, counts, timings)  or  Error(code, message)

Whoever reads the events (an adapter's greenlet) may ``cancel()`` at any time; the engine sees
the flag before its next step and ends the reply with ``Done(FinishReason.CANCELLED)``.
Events cross from the engine's thread through a ``handoff.EventChannel``.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Iterator

from tanglebox import handoff
from tanglebox.chat_request import ChatRequest


class FinishReason(StrEnum):
    """Why a reply ended; the values are what the wire formats send (``finishReason``)."""

    STOP = "stop"  # the model ended its turn, or a stop string came
    LENGTH = "length"  # maxNewTokens, or the end of the model's context
    CANCELLED = "cancelled"  # the client left, pressed Stop, or a reconnect took over
    TIMEOUT = "timeout"  # requestTimeoutSeconds
    SHUTDOWN = "shutdown"  # the server stopped before the reply was done


class ErrorCode(StrEnum):
    """What went wrong when a reply could not be written (``Error.code``)."""

    PROMPT_TOO_LONG = "prompt_too_long"
    TEMPLATE = "template"
    INTERNAL = "internal"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Done:
    finish_reason: FinishReason
    text: str  # the whole reply
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the conversation's previous turn
    timings: dict[str, float]


@dataclass(frozen=True)
class Error:
    code: ErrorCode
    message: str  # a sentence for the user, saying what to change when they can


Event = Delta | Done | Error


class Generation:
    """One reply being generated: read its ``events()``, or ``cancel()`` it."""

    def __init__(self, request: ChatRequest) -> None:
        self.id = uuid.uuid4().hex
        self.request = request
        self.submitted_at = time.monotonic()
        self.cancelled = False
        self._channel = handoff.EventChannel()
        self._finished = False

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine thread before its next step

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event, or None if none came within ``timeout`` seconds."""
        if self._finished:
            raise RuntimeError("the generation has already finished")
        event = self._channel.get(timeout)
        self._finished = isinstance(event, (Done, Error))
        return event

    def events(self) -> Iterator[Event]:
        """Every event up to and including the final Done or Error."""
        while not self._finished:
            yield self.next_event()

    # -- the engine's side ---------------------------------------------------------------

    def _emit(self, event: Event, wake: bool = True) -> None:
        self._channel.put(event, final=isinstance(event, (Done, Error)), wake=wake)

    def _wake(self) -> None:
        self._channel.wake()

    def _end_unstarted(self, reason: FinishReason) -> None:
        """Answer a request that ends before it ever reached a slot."""
        self._emit(Done(reason, "", 0, 0, 0, {}))

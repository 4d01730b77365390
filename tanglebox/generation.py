"""One reply as an adapter sees it: the events it reads, and how a reply can end.

The engine answers every submitted request with a :class:`Generation`; its events are::

    Delta(text)*  then  Done(finish_reason, text, counts, timings)  or  Error(code, message)

An adapter passes them on with one loop, ``for event in generation.relay(client_gone)``: the
relay looks at the client after every event and every ``RELAY_POLL_SECONDS`` without one (a
queued request, a long prompt), and cancels the generation whenever it ends before the final
event: the client left, the adapter stopped reading (a ``break``, an exception, a killed
greenlet). The engine sees the flag before its next step, so the reply leaves the batch and
frees its slot there. Events cross from the engine's thread through a
``handoff.EventChannel``.

How a reply that ended early is explained to a person is written once too: ``ENDED_EARLY``.

Every event a reply emits, on every surface, passes ``_emit``: there a ``watcher``
(``tanglebox.metrics``) is told of it, on the emitting thread.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Callable, Iterator, Protocol

from tanglebox import handoff
from tanglebox.chat_request import ChatRequest


# How often a relay looks at its client while no event comes: a Stop pressed in the chat UI
# shows within this, and a vanished client's reply leaves the batch within this plus a step.
RELAY_POLL_SECONDS = 0.1


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
    GRAMMAR = "grammar"  # the request's grammar (response_format) cannot be used
    UPSTREAM = "upstream"  # a remote model's server failed, answered an error, or was unreadable
    UNAVAILABLE = "unavailable"  # a remote model's server could not be reached: try again later


@dataclass(frozen=True)
class TopLogprob:
    token: str  # the token's text (its bytes decoded; a part of a character shows as U+FFFD)
    bytes: bytes
    logprob: float  # natural log of its probability under the model (before sampling rules)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log probability, and the most likely tokens at its position."""

    token: str
    bytes: bytes
    logprob: float
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class Delta:
    text: str
    # With ``SamplingOptions.top_logprobs``: the tokens generated since the last Delta (a token
    # whose text is held back, a partial character or stop string, comes with a later one).
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Done:
    finish_reason: FinishReason
    text: str  # the whole reply
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens reused from the conversation's previous turn
    timings: dict[str, float]
    logprobs: tuple[TokenLogprob, ...] = ()  # every token's, when asked for (top_logprobs)


@dataclass(frozen=True)
class Error:
    code: ErrorCode
    message: str  # a sentence for the user, saying what to change when they can


Event = Delta | Done | Error

# The one sentence for "no new work, the server is stopping", whenever a request hears it.
SHUTTING_DOWN = "The server is shutting down; try again in a few seconds."

# A reply that ended before the model finished it, in the words every surface shows after it.
ENDED_EARLY = {
    FinishReason.CANCELLED: "Stopped.",
    FinishReason.TIMEOUT: "The reply took too long and was stopped (the server's "
                          "requestTimeoutSeconds).",
    FinishReason.SHUTDOWN: "The server is shutting down; the reply was cut short.",
}


class Watcher(Protocol):
    """Told of each event as it is emitted (on the engine's thread: it must never wait)."""

    def emitted(self, generation: "Generation", event: Event) -> None: ...


class Generation:
    """One reply being generated: read its ``events()``, or ``cancel()`` it."""

    def __init__(self, request: ChatRequest) -> None:
        self.id = uuid.uuid4().hex
        self.request = request
        self.submitted_at = time.monotonic()
        self.cancelled = False
        self._channel = handoff.EventChannel()
        self._finished = False
        # Set by an engine that can stop a reply at once (a remote one closes its stream).
        self._on_cancel: Callable[[], None] | None = None
        self.watcher: Watcher | None = None  # set after submit: see ``final_emitted``
        # When the first Delta and the final event were emitted (which may be before a
        # watcher was set, so a watcher reads them here too).
        self.first_delta_at: float | None = None
        self.final_emitted: Done | Error | None = None
        # What the model read, set by its engine at admission (before the first event): the
        # rendered prompt (local), or the messages sent upstream as JSON (remote, whose
        # template the upstream applies: ``prompt_by_upstream``). Stored with a UI reply.
        self.prompt_text: str | None = None
        self.prompt_by_upstream = False

    def cancel(self) -> None:
        self.cancelled = True  # read by the engine thread before its next step
        if self._on_cancel is not None:
            self._on_cancel()

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

    def relay(self, client_gone: Callable[[], bool] | None = None,
              ticks: bool = False) -> Iterator[Event | None]:
        """The events up to and including the final one, for an adapter to pass on.

        ``client_gone()`` is asked after every event and every ``RELAY_POLL_SECONDS`` without
        one; True ends the relay there. With ``ticks``, each such quiet poll also yields None,
        so the caller can watch its client itself. Whenever the relay ends before the final
        event (the client is gone, or the caller stops reading: CPython closes a generator,
        running this ``finally``, as soon as nothing refers to it), it cancels the generation.
        """
        finished = False
        try:
            while not finished:
                event = self.next_event(RELAY_POLL_SECONDS)
                if client_gone is not None and client_gone():
                    return
                finished = isinstance(event, (Done, Error))
                if event is not None or ticks:
                    yield event
        finally:
            if not finished:
                self.cancel()

    # -- the engine's side ---------------------------------------------------------------

    def _emit(self, event: Event, wake: bool = True) -> None:
        final = isinstance(event, (Done, Error))
        if final:
            self.final_emitted = event  # before the watcher is read: see metrics.ReplyMetrics.watch
        elif self.first_delta_at is None:
            self.first_delta_at = time.monotonic()
        watcher = self.watcher
        if watcher is not None:
            watcher.emitted(self, event)
        self._channel.put(event, final=final, wake=wake)

    def _wake(self) -> None:
        self._channel.wake()

    def _end_unstarted(self, reason: FinishReason) -> None:
        """Answer a request that ends before it ever reached a slot."""
        self._emit(Done(reason, "", 0, 0, 0, {}))

"""What a running server holds (its settings and, once the model has loaded, its engine), and
the one door every adapter's requests go through.

One ``Runtime`` per Flask app (``app.extensions["tanglebox"]``), never module globals, so a
test process can run several apps side by side.

An adapter parses its wire format into a ``ChatRequest`` (``chat_request.py``), then::

    runtime.submit(request) ──► Generation           relay its events: generation.relay()
                            └─► raises Refused       maintenance, loading, load failed,
                                                     queue full (for all, or this
                                                     client's share), shutting down

A :class:`Refused` carries the one sentence for that refusal (the same on every surface),
when to try again, and the HTTP status; each adapter only puts it in its own format.
Adapters that answer the server's state before reading a request (REST, the original
socket) call :meth:`Runtime.check_open` first.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum

from flask import current_app

from tanglebox.chat_request import ChatRequest, Limits
from tanglebox.engine import ClientQueueFull, Engine, EngineStopped, QueueFull
from tanglebox.generation import SHUTTING_DOWN, Generation
from tanglebox.settings import Settings

MAINTENANCE_RETRY_AFTER = 60
LOADING_RETRY_AFTER = 5
SHUTDOWN_RETRY_AFTER = 5
SERVICE_UNAVAILABLE = 503
TOO_MANY_REQUESTS = 429


class RuntimeState(StrEnum):
    """The model's state, as ``/health`` says it."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class Refusal(StrEnum):
    """Why the server will not start a reply now."""

    MAINTENANCE = "maintenance"
    LOADING = "loading"
    LOAD_FAILED = "load_failed"
    QUEUE_FULL = "queue_full"
    CLIENT_QUEUE_FULL = "client_queue_full"
    SHUTTING_DOWN = "shutting_down"


class Refused(Exception):
    """A request the server will not start now.

    ``message`` is the sentence for the person or program that sent it, ``retry_after`` how
    many seconds to wait before trying again, ``status`` the HTTP status that says so.
    """

    def __init__(self, reason: Refusal, message: str, retry_after: int,
                 status: int = SERVICE_UNAVAILABLE) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.status = status


@dataclass
class Runtime:
    settings: Settings
    engine: Engine | None = None
    state: RuntimeState = RuntimeState.LOADING
    load_error: str = ""
    started_at: float = field(default_factory=time.time)  # the OpenAI API's model "created"

    def attach_engine(self, engine: Engine) -> None:
        self.engine = engine
        self.state = RuntimeState.READY

    def fail(self, message: str) -> None:
        self.state = RuntimeState.FAILED
        self.load_error = message

    def check_open(self) -> None:
        """Raise Refused unless the server takes work now: in maintenance mode, while the
        model loads, when it failed to load."""
        settings = self.settings
        if settings["maintenanceMode"]:
            raise Refused(Refusal.MAINTENANCE, settings["maintenanceMessage"],
                          MAINTENANCE_RETRY_AFTER)
        if self.engine is None:
            if self.state == RuntimeState.FAILED:
                raise Refused(Refusal.LOAD_FAILED, "The model failed to load.",
                              LOADING_RETRY_AFTER)
            raise Refused(Refusal.LOADING, "The model is still loading; try again in a few "
                                           "seconds.", LOADING_RETRY_AFTER)

    def submit(self, request: ChatRequest) -> Generation:
        """Queue ``request`` on the engine, or raise Refused at once (never a wait)."""
        self.check_open()
        try:
            return self.engine.submit(request)
        except ClientQueueFull as full:
            raise Refused(Refusal.CLIENT_QUEUE_FULL,
                          f"You already have {full.per_client} requests waiting for a reply; "
                          "wait for them before sending more.", full.retry_after,
                          TOO_MANY_REQUESTS) from None
        except QueueFull as full:
            raise Refused(Refusal.QUEUE_FULL, "The server is busy with other replies; try "
                                              "again in a few seconds.",
                          full.retry_after) from None
        except EngineStopped:
            raise Refused(Refusal.SHUTTING_DOWN, SHUTTING_DOWN, SHUTDOWN_RETRY_AFTER) from None

    def limits(self) -> Limits:
        s = self.settings
        return Limits(temperature=float(s["temperature"]), max_new_tokens=s["maxNewTokens"],
                      max_new_tokens_limit=s["maxNewTokensLimit"])

    @property
    def model_name(self) -> str:
        return self.engine.backend.model_name if self.engine else self.settings["modelName"]

    @property
    def device(self) -> str:
        return self.engine.backend.device if self.engine else self.settings["device"]


def current_runtime() -> Runtime:
    return current_app.extensions["tanglebox"]

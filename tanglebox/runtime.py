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

The runtime serves several models (``tanglebox.served_models``): the local engine, once it
has loaded (none when ``modelName`` is empty), and a ``RemoteEngine`` per ``remoteEndpoints``
entry. ``submit`` routes by ``ChatRequest.model`` (None: ``default_model_id``), and an id
nobody serves raises :class:`UnknownModel` for the adapter to answer in its format.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import TYPE_CHECKING, Any

from flask import current_app

from tanglebox import handoff
from tanglebox.chat_request import ChatRequest, Limits
from tanglebox.client_json import RequestError, shown
from tanglebox.engine import ClientQueueFull, Engine, EngineStopped, QueueFull
from tanglebox.generation import SHUTTING_DOWN, Generation
from tanglebox.metrics import ReplyMetrics
from tanglebox.model_location import model_id
from tanglebox.remote_engine import EndpointUnavailable, RemoteEngine, unavailable_message
from tanglebox.served_models import (LOCAL, ModelEngine, ModelState, ModelStatus,
                                     UnknownModel)
from tanglebox.settings import Settings

if TYPE_CHECKING:
    from tanglebox.embeddings import Embedder

MAINTENANCE_RETRY_AFTER = 60
LOADING_RETRY_AFTER = 5
SHUTDOWN_RETRY_AFTER = 5
SERVICE_UNAVAILABLE = 503
TOO_MANY_REQUESTS = 429
# The one sentence for a full queue, replies and embeddings alike.
QUEUE_FULL_MESSAGE = "The server is busy with other replies; try again in a few seconds."


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
    MODEL_UNAVAILABLE = "model_unavailable"  # a remote model whose endpoint does not answer


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
    remotes: dict[str, RemoteEngine] = field(default_factory=dict)  # by model id
    metrics: ReplyMetrics = field(default_factory=ReplyMetrics, repr=False)  # its replies
    _embedder: Embedder | None = field(default=None, init=False, repr=False)
    _embedder_lock: Any = field(default_factory=handoff.native_lock, init=False, repr=False)

    def attach_engine(self, engine: Engine) -> None:
        self.engine = engine
        self.state = RuntimeState.READY

    def fail(self, message: str) -> None:
        self.state = RuntimeState.FAILED
        self.load_error = message

    def attach_remote(self, remote: RemoteEngine) -> None:
        self.remotes[remote.name] = remote

    # -- the models served ---------------------------------------------------------------

    @cached_property
    def local_model_id(self) -> str | None:
        """The local model's id; None when ``modelName`` is empty (remote models only). Read
        once: the settings are the process's, and every page fragment asks."""
        return model_id(self.settings) if self.settings["modelName"] else None

    @property
    def default_model_id(self) -> str:
        """The model of a request that names none: the local one, else the first remote."""
        return self.local_model_id or next(iter(self.remotes), "")

    def model_ids(self) -> list[str]:
        """Every served model's id, the default first."""
        local = [self.local_model_id] if self.local_model_id else []
        return local + [name for name in self.remotes if name not in local]

    def resolve_model(self, name: str | None) -> str:
        """The id of the model ``name`` means (an id, a local alias; None: the default)."""
        if name is None:
            return self.default_model_id
        if name in self.remotes:
            return name
        local = self.local_model_id
        if local and (name == local or name in self.settings["modelAliases"]):
            return local
        raise UnknownModel(name, self.model_ids())

    def known_model(self, name: object) -> str | None:
        """The id ``name`` resolves to, or None (the default) for anything else."""
        try:
            return self.resolve_model(name) if isinstance(name, str) else None
        except UnknownModel:
            return None

    def chosen_model(self, value: object, param: str = "model") -> str | None:
        """A client's choice of model (REST's ``model``, the original socket's
        ``#-set-model-#``): its id, None when absent; a RequestError naming ``param`` and
        listing the ids otherwise."""
        if value is None or value == "":
            return None
        model = self.known_model(value)
        if model is not None:
            return model
        raise RequestError(param, f"must be the id of a served model, one of: "
                                  f"{', '.join(self.model_ids())}; got {shown(value)}")

    def model_statuses(self) -> list[ModelStatus]:
        """Each model's state and load, in ``model_ids()`` order; no network."""
        statuses = [self.remotes[name].status() if name in self.remotes else self._local_status()
                    for name in self.model_ids()]
        return statuses

    def _local_status(self) -> ModelStatus:
        engine = self.engine
        load = engine.load() if engine else {"slots": self.settings["parallelSlots"],
                                             "busy": 0, "waiting": 0}
        state = {RuntimeState.LOADING: ModelState.LOADING, RuntimeState.READY: ModelState.READY,
                 RuntimeState.FAILED: ModelState.FAILED}[self.state]
        return ModelStatus(id=self.local_model_id or "", kind=LOCAL, state=state,
                           detail=self.load_error if state == ModelState.FAILED else
                           "loading" if state == ModelState.LOADING else "",
                           busy=load["busy"], waiting=load["waiting"], capacity=load["slots"],
                           cached_prompt_tokens=getattr(engine, "cached_prompt_tokens", 0),
                           upstream_errors=0)

    def engines(self) -> list[ModelEngine]:
        """Every engine running now, the local one first: for shutdown."""
        return ([self.engine] if self.engine else []) + list(self.remotes.values())

    # -- the one door --------------------------------------------------------------------

    def check_open(self, model: str | None = None) -> None:
        """Raise Refused unless the server takes work for ``model`` (an id; None: the
        default) now: in maintenance mode, while the model loads, when it failed to load,
        when a remote model's endpoint does not answer. Each refusal is counted
        (``/metrics``)."""
        try:
            self._check_open(model or self.default_model_id)
        except Refused as refused:
            self.metrics.refused(model or self.default_model_id, refused.reason)
            raise

    def _check_open(self, model: str) -> None:
        settings = self.settings
        if settings["maintenanceMode"]:
            raise Refused(Refusal.MAINTENANCE, settings["maintenanceMessage"],
                          MAINTENANCE_RETRY_AFTER)
        remote = self.remotes.get(model)
        if remote is not None:
            if remote.state == ModelState.UNAVAILABLE:
                raise Refused(Refusal.MODEL_UNAVAILABLE, unavailable_message(model),
                              LOADING_RETRY_AFTER)
            return
        if self.engine is None:
            if self.state == RuntimeState.FAILED:
                raise Refused(Refusal.LOAD_FAILED, "The model failed to load.",
                              LOADING_RETRY_AFTER)
            raise Refused(Refusal.LOADING, "The model is still loading; try again in a few "
                                           "seconds.", LOADING_RETRY_AFTER)

    def submit(self, request: ChatRequest) -> Generation:
        """Queue ``request`` on its model's engine, or raise Refused at once (never a wait);
        UnknownModel for a model nobody serves. Each reply and refusal is counted."""
        model = self.resolve_model(request.model)
        self.check_open(model)
        try:
            generation = self._queue(model, request)
        except Refused as refused:
            self.metrics.refused(model, refused.reason)
            raise
        self.metrics.watch(generation, model)  # counted on the surface it came in by
        return generation

    def _queue(self, model: str, request: ChatRequest) -> Generation:
        engine: ModelEngine = self.remotes.get(model) or self.engine
        try:
            return engine.submit(request)
        except EndpointUnavailable:
            raise Refused(Refusal.MODEL_UNAVAILABLE, unavailable_message(model),
                          LOADING_RETRY_AFTER) from None
        except ClientQueueFull as full:
            raise Refused(Refusal.CLIENT_QUEUE_FULL,
                          f"You already have {full.per_client} requests waiting for a reply; "
                          "wait for them before sending more.", full.retry_after,
                          TOO_MANY_REQUESTS) from None
        except QueueFull as full:
            raise Refused(Refusal.QUEUE_FULL, QUEUE_FULL_MESSAGE, full.retry_after) from None
        except EngineStopped:
            raise Refused(Refusal.SHUTTING_DOWN, SHUTTING_DOWN, SHUTDOWN_RETRY_AFTER) from None

    def embedder(self) -> Embedder:
        """The model's embedder (``tanglebox.embeddings``), made at the first call, one per
        engine; raises Refused as ``check_open`` does. It is closed with the engine: stopping
        the engine closes the backend and with it the embeddings context."""
        self.check_open(self.local_model_id)
        from tanglebox.embeddings import Embedder  # it imports this module (Refused)
        with self._embedder_lock:  # no wait inside: safe in a greenlet too
            if self._embedder is None or self._embedder.backend is not self.engine.backend:
                self._embedder = Embedder(self.engine.backend)
            return self._embedder

    def limits(self) -> Limits:
        s = self.settings
        return Limits(temperature=float(s["temperature"]), max_new_tokens=s["maxNewTokens"],
                      max_new_tokens_limit=s["maxNewTokensLimit"])

    @property
    def model_name(self) -> str:
        if self.engine:
            return self.engine.backend.model_name
        return self.settings["modelName"] or self.default_model_id

    @property
    def device(self) -> str:
        if self.engine:
            return self.engine.backend.device
        return self.settings["device"] if self.settings["modelName"] else "remote"


def current_runtime() -> Runtime:
    return current_app.extensions["tanglebox"]

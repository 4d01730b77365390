"""The models one server serves, as every surface names them, and their state.

A server serves its local model (``modelName``; none when it is empty) and each of its
``remoteEndpoints``. Every model has an id: the local one's is ``model_location.model_id``
(``modelId``, else the file's name), a remote one's is its ``name``. Requests choose a model by
id (``ChatRequest.model``; None: the default, the local model when there is one, else the first
endpoint); ``modelAliases`` are other names of the local model.

:class:`ModelStatus` is what ``/health``, ``/metrics`` and the UI's picker read
(``Runtime.model_statuses()``): cheap, no network, one per model, the default first.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from tanglebox.chat_request import ChatRequest
from tanglebox.generation import Generation

LOCAL, REMOTE = "local", "remote"


class ModelState(StrEnum):
    """What /health and the UI show for one model."""

    LOADING = "loading"  # the local model loads; a remote one's first check is under way
    READY = "ready"
    FAILED = "failed"  # the local model failed to load
    UNAVAILABLE = "unavailable"  # a remote endpoint that does not answer (or refuses the key)


@dataclass(frozen=True)
class ModelStatus:
    id: str  # as /v1/models lists it
    kind: str  # LOCAL or REMOTE
    state: ModelState
    detail: str  # operator-facing reason when not ready ("" when ready); never a key
    busy: int  # replies running now
    waiting: int  # replies queued
    capacity: int  # slots (local) or maxConcurrent (remote)
    cached_prompt_tokens: int  # counter: prompt tokens served from the prefix cache (local)
    upstream_errors: int  # counter: failed upstream calls (remote)


class UnknownModel(Exception):
    """A model id nobody serves here; ``available`` lists the ids that are."""

    def __init__(self, name: str, available: list[str]) -> None:
        super().__init__(f"no model {name!r}; served: {', '.join(available)}")
        self.name = name
        self.available = available


class ModelEngine(Protocol):
    """What the runtime needs of an engine, local (``Engine``) or remote (``RemoteEngine``)."""

    def submit(self, request: ChatRequest) -> Generation: ...

    def load(self) -> dict[str, int]: ...

    def stop(self, drain_seconds: float = 30.0, wait: bool = True) -> None: ...

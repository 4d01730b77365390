"""What a running server holds: its settings and, once the model has loaded, its engine.

One ``Runtime`` per Flask app (``app.extensions["tanglebox"]``), never module globals, so a
test process can run several apps side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from flask import current_app

from tanglebox.chat_request import Limits
from tanglebox.engine import Engine
from tanglebox.settings import Settings


class RuntimeState(StrEnum):
    """The model's state, as ``/health`` says it."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class NotReady(Exception):
    """The model is still loading (or failed to load): 503 + Retry-After."""


@dataclass
class Runtime:
    settings: Settings
    engine: Engine | None = None
    state: RuntimeState = RuntimeState.LOADING
    load_error: str = ""

    def attach_engine(self, engine: Engine) -> None:
        self.engine = engine
        self.state = RuntimeState.READY

    def fail(self, message: str) -> None:
        self.state = RuntimeState.FAILED
        self.load_error = message

    def ready_engine(self) -> Engine:
        if self.engine is None:
            raise NotReady("The model is still loading; try again in a few seconds."
                           if self.state == RuntimeState.LOADING else "The model failed to load.")
        return self.engine

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

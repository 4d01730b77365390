"""A runtime that serves several models on fake backends, for tests of the model picker.

``serve_models(settings, default, extra, unavailable)`` serves ``default`` as the default model
(its id from the settings, as always), each backend of ``extra`` under its id on an engine of
its own, and lists each id of ``unavailable`` as a model that is down. It goes only through the
served-models interface (``model_ids``, ``model_statuses``, ``submit`` routing by
``ChatRequest.model``), so the same tests run whether remote engines are built in or not.
"""

from __future__ import annotations

from dataclasses import replace

from tanglebox.chat_request import ChatRequest
from tanglebox.engine import engine_from_settings
from tanglebox.generation import Generation
from tanglebox.runtime import Runtime
from tanglebox.served_models import ModelState, ModelStatus
from tanglebox.settings import Settings


class ExtraModelsRuntime(Runtime):
    """The default model, plus models by id on runtimes of their own, plus ids that are down."""

    def __init__(self, settings: Settings, extra: dict[str, Runtime],
                 unavailable: tuple[str, ...] = ()) -> None:
        super().__init__(settings)
        self.extra = extra
        self.unavailable = unavailable

    def model_ids(self) -> list[str]:
        return [*super().model_ids(), *self.extra, *self.unavailable]

    def model_statuses(self) -> list[ModelStatus]:
        down = [ModelStatus(name, "remote", ModelState.UNAVAILABLE, "a test's model, never up",
                            0, 0, 1, 0, 0) for name in self.unavailable]
        # Runtime's statuses follow model_ids(), this class's: its own models come first.
        own = super().model_statuses()[:len(Runtime.model_ids(self))]
        return [*own,
                *(replace(runtime.model_statuses()[0], id=name)
                  for name, runtime in self.extra.items()), *down]

    def submit(self, request: ChatRequest) -> Generation:
        if request.model in self.extra:
            return self.extra[request.model].submit(replace(request, model=None))
        return super().submit(request)

    def stop(self) -> None:
        for runtime in (self, *self.extra.values()):
            if runtime.engine is not None:
                runtime.engine.stop(drain_seconds=1)


def serve_models(settings: Settings, default, extra: dict[str, object],
                 unavailable: tuple[str, ...] = ()) -> ExtraModelsRuntime:
    """An ExtraModelsRuntime with an engine on each backend, ready to take requests."""
    others = {}
    for name, backend in extra.items():
        others[name] = Runtime(settings)
        others[name].attach_engine(engine_from_settings(settings, backend))
    runtime = ExtraModelsRuntime(settings, others, unavailable)
    runtime.attach_engine(engine_from_settings(settings, default))
    return runtime

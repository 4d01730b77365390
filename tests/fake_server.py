"""Serve the fake backend with the production stack: ``python -m tests.fake_server SETTINGS FAKE_JSON``.

FAKE_JSON holds ``FakeBackend``'s arguments, and optionally ``extra_models`` (more models, by
id: each one's own ``FakeBackend`` arguments) and ``unavailable_models`` (ids listed as down):
``tests.extra_models``.
"""

from __future__ import annotations

import json
import sys

from tanglebox.engine import engine_from_settings
from tanglebox.runtime import Runtime
from tanglebox.serving import (TangleboxServer, configure_logging, create_app_or_stop,
                               start_remotes)
from tanglebox.settings import load_settings
from tests.extra_models import serve_models
from tests.fake_backend import FakeBackend


class FakeServer(TangleboxServer):
    def __init__(self, settings, fake_options: dict) -> None:
        self.fake_options = fake_options
        super().__init__(settings, location=None)

    def load(self):
        configure_logging(self.settings)
        options = dict(self.fake_options)
        extra = options.pop("extra_models", {})
        unavailable = tuple(options.pop("unavailable_models", ()))
        if extra or unavailable:
            runtime = serve_models(self.settings, FakeBackend(**options),
                                   {name: FakeBackend(**kwargs) for name, kwargs in extra.items()},
                                   unavailable)
        else:
            runtime = Runtime(self.settings)
            if self.settings["modelName"]:
                runtime.attach_engine(engine_from_settings(self.settings, FakeBackend(**options)))
        start_remotes(runtime)  # remoteEndpoints, as in production
        return create_app_or_stop(self.settings, runtime)


if __name__ == "__main__":
    FakeServer(load_settings(sys.argv[1]), json.loads(sys.argv[2])).run()

"""Serve the fake backend with the production stack: ``python -m tests.fake_server SETTINGS FAKE_JSON``."""

from __future__ import annotations

import json
import sys

from tanglebox.engine import engine_from_settings
from tanglebox.runtime import Runtime
from tanglebox.serving import TangleboxServer, configure_logging, start_remotes
from tanglebox.settings import load_settings
from tests.fake_backend import FakeBackend


class FakeServer(TangleboxServer):
    def __init__(self, settings, fake_options: dict) -> None:
        self.fake_options = fake_options
        super().__init__(settings, location=None)

    def load(self):
        from tanglebox.web import create_app
        configure_logging(self.settings)
        runtime = Runtime(self.settings)
        if self.settings["modelName"]:
            runtime.attach_engine(engine_from_settings(self.settings,
                                                       FakeBackend(**self.fake_options)))
        start_remotes(runtime)  # remoteEndpoints, as in production
        return create_app(self.settings, runtime)


if __name__ == "__main__":
    FakeServer(load_settings(sys.argv[1]), json.loads(sys.argv[2])).run()

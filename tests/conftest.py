"""Fixtures: an app on the fake backend (Flask test client), and live servers on free ports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tanglebox.engine import engine_from_settings  # noqa: E402
from tanglebox.runtime import Runtime  # noqa: E402
from tanglebox.settings import load_settings  # noqa: E402
from tanglebox.web import create_app  # noqa: E402
from tests.fake_backend import FakeBackend  # noqa: E402
from tests.live_server import LiveServer  # noqa: E402


def write_settings(folder: Path, **values) -> Path:
    path = folder / "settings.json"
    path.write_text(json.dumps(values), encoding="utf-8")
    return path


@pytest.fixture
def settings_values() -> dict:
    """Override in a test module (or parametrize) to change settings for ``app``."""
    return {}


@pytest.fixture
def fake_backend() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def app(tmp_path, settings_values, fake_backend):
    settings = load_settings(write_settings(tmp_path, **settings_values))
    engine = engine_from_settings(settings, fake_backend)
    runtime = Runtime(settings)
    runtime.attach_engine(engine)
    app = create_app(settings, runtime)
    app.config["TESTING"] = True
    yield app
    engine.stop(drain_seconds=1)


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def fake_server(tmp_path):
    """A live server (gunicorn + gevent, the real stack) on the fake backend.

    Use ``fake_server.start(settings..., fake={...FakeBackend kwargs})``.
    """
    server = LiveServer(tmp_path)
    yield server
    server.stop()

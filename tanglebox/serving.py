"""Start serving: check everything a user could have got wrong, then run gunicorn + gevent.

``python app.py`` and production use the same stack: gunicorn with the gevent worker class and
one worker per model (the model lives in the worker process). The worker starts listening at
once and loads the model on a native thread; ``/health`` answers 503 "loading" until the
engine is ready. Everything that can be checked before loading (settings, the model path, the
template name, the device) is checked first, so a mistake is one line and exit status 2, with
no half-started server.
"""

from __future__ import annotations

import logging
import os
import sys

from gunicorn.app.base import BaseApplication

from tanglebox import handoff
from tanglebox.backends import check_device, load_backend
from tanglebox.engine import Engine
from tanglebox.model_location import ModelLocation, locate_model
from tanglebox.prompting import template_names
from tanglebox.runtime import Runtime
from tanglebox.settings import Settings, SettingsError, load_settings

log = logging.getLogger("tanglebox")

WORKER_BOOT_ERROR = 3  # gunicorn's code: the master halts instead of restarting the worker
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'  # path only: no tokens


def preflight(settings: Settings) -> ModelLocation:
    """Everything checkable before loading; raises SettingsError with one line to act on."""
    template = settings["conversationTemplate"]
    if template not in template_names():
        raise SettingsError(f"{settings.path.name}: \"conversationTemplate\" is \"{template}\", "
                            f"which is not in conversation_templates.py; choose one of "
                            f"{', '.join(template_names())}")
    location = locate_model(settings)
    check_device(settings, location)
    return location


def build_engine(settings: Settings, location: ModelLocation) -> Engine:
    backend = load_backend(settings, location)
    engine = Engine(backend, settings["conversationTemplate"],
                    default_system_prompt=settings["systemPrompt"],
                    queue_size=settings["queueSize"],
                    request_timeout=settings["requestTimeoutSeconds"], seed=settings["seed"],
                    log_prompts=settings["enableModelDebugOutput"])
    engine.render_check()
    engine.start()
    return engine


def start_loading(runtime: Runtime, location: ModelLocation, exit_on_failure: bool) -> None:
    """Load the model on a native thread; the server answers /health meanwhile."""
    def load() -> None:
        try:
            runtime.attach_engine(build_engine(runtime.settings, location))
            log.info("model ready: %s (%s on %s)", runtime.model_name,
                     runtime.engine.backend.name, runtime.device)
        except Exception as err:  # noqa: BLE001 - reported on one line, below
            message = str(err) if isinstance(err, SettingsError) else (
                f"loading {location.path.name} failed: {err}")
            runtime.fail(message)
            if exit_on_failure:
                print(f"tanglebox: error: {message}", file=sys.stderr, flush=True)
                os._exit(WORKER_BOOT_ERROR)
            log.exception("loading the model failed")

    handoff.start_native_thread(load)


def configure_logging(settings: Settings) -> None:
    level = logging.DEBUG if settings["enableModelDebugOutput"] else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class TangleboxServer(BaseApplication):
    """gunicorn, configured from settings, serving an app built inside the worker."""

    def __init__(self, settings: Settings, location: ModelLocation) -> None:
        self.settings = settings
        self.location = location
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        config = {
            "bind": [f"[{s['host']}]:{s['port']}" if ":" in s["host"] else
                     f"{s['host']}:{s['port']}"],
            "worker_class": "gevent",
            "workers": 1,  # one worker per model: the model lives in the process
            "worker_connections": 1000,
            "graceful_timeout": 30,
            "timeout": 120,
            "loglevel": "warning",
            "accesslog": "-" if s["enableWebLogOutput"] else None,
            "access_log_format": ACCESS_LOG_FORMAT,
            "worker_exit": _stop_engine,
        }
        if s["useSsl"]:
            config["certfile"] = str(s.relative_path(s["sslCertFile"]))
            config["keyfile"] = str(s.relative_path(s["sslKeyFile"]))
        for key, value in config.items():
            self.cfg.set(key, value)

    def load(self):
        from tanglebox.web import create_app
        configure_logging(self.settings)
        app = create_app(self.settings)
        start_loading(app.extensions["tanglebox"], self.location, exit_on_failure=True)
        return app


def _stop_engine(server, worker) -> None:
    """Graceful shutdown: running replies finish (or end with a clear message)."""
    app = getattr(worker, "wsgi", None)
    runtime = app.extensions.get("tanglebox") if app is not None else None
    if runtime is not None and runtime.engine is not None:
        runtime.engine.stop(drain_seconds=10)


def production_app():
    """For ``gunicorn -k gevent -w 1 'tanglebox.serving:production_app()'``.

    Reads settings.json from ``TANGLEBOX_SETTINGS`` (default: ./settings.json) and the
    ``TANGLEBOX_*`` environment variables.
    """
    from tanglebox.web import create_app
    settings = load_settings(os.environ.get("TANGLEBOX_SETTINGS", "settings.json"))
    location = preflight(settings)
    configure_logging(settings)
    app = create_app(settings)
    start_loading(app.extensions["tanglebox"], location, exit_on_failure=True)
    return app

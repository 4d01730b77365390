"""Start serving: check everything a user could have got wrong, then run gunicorn + gevent.

``python app.py`` and production use the same stack: gunicorn with the gevent worker class and
one worker per model (the model lives in the worker process). The worker starts listening at
once and loads the model on a native thread; ``/health`` answers 503 "loading" until the
engine is ready. Everything that can be checked before loading (settings, the model path, the
template name, the device, the token file; ``python app.py`` then checks its address and TLS
files, :mod:`tanglebox.listener`) is checked first, so a mistake is one line and exit status 2,
with no half-started server.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from gunicorn.app.base import BaseApplication

from tanglebox import handoff
from tanglebox.api_tokens import TokenFileError, read_token_text
from tanglebox.backends import check_device, load_backend
from tanglebox.engine import Engine, engine_from_settings
from tanglebox.json_logging import announce, gunicorn_logger_class, json_handler
from tanglebox.listener import tls_context_or_stop
from tanglebox.model_location import ModelLocation, check_widget_model, locate_model, model_id
from tanglebox.prompting import template_names
from tanglebox.remote_engine import RemoteEngine
from tanglebox.runtime import Runtime
from tanglebox.settings import Settings, SettingsError, load_settings
from tanglebox.upstream_client import upstreams_from_settings
from tanglebox.worker_crashes import WorkerCrashes

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger("tanglebox")

WORKER_BOOT_ERROR = 3  # gunicorn's code: the master halts instead of restarting the worker
ACCESS_LOG_FORMAT = '%(h)s "%(m)s %(U)s %(H)s" %(s)s %(b)s %(M)sms'  # path only: no tokens
GRACEFUL_TIMEOUT_SECONDS = 30
DRAIN_MARGIN_SECONDS = 5  # of the graceful timeout, kept for the last messages to go out
PINNED_GUNICORN_SETTINGS = ("worker_class", "workers")
# Places in the worker's pool beyond maxConnections, for /health and for the refusals
# (tanglebox.web.connection_limits; not imported here: the master must not import the web
# stack before the worker patches it for gevent).
CONNECTION_HEADROOM = 100


def preflight(settings: Settings) -> ModelLocation | None:
    """Everything checkable before loading; raises SettingsError with one line to act on.

    The local model's location; None when ``modelName`` is empty (remote models only)."""
    check_widget_model(settings)
    template = settings["conversationTemplate"]
    if template not in template_names():
        raise SettingsError(f"{settings.path.name}: \"conversationTemplate\" is \"{template}\", "
                            f"which is not in conversation_templates.py; choose one of "
                            f"{', '.join(template_names())}")
    location = None
    if settings["modelName"]:
        try:
            location = locate_model(settings)
        except OSError as err:  # a name too long for the file system, a folder it may not read
            raise SettingsError(f"{settings.path.name}: \"modelName\" cannot be checked "
                                f"({err.strerror}); give a .gguf file or a transformers model "
                                "folder") from None
        check_device(settings, location)
        local = model_id(settings)
        if any(upstream.name == local for upstream in upstreams_from_settings(settings)):
            raise SettingsError(f"{settings.path.name}: \"remoteEndpoints\" has a model named "
                                f"\"{local}\", the local model's id; rename one of them")
    upstreams_from_settings(settings)  # each apiKeyEnv is set
    if settings["isApiTokensRequired"]:
        try:
            read_token_text(settings.relative_path(settings["apiTokensFile"]))
        except TokenFileError as err:
            raise SettingsError(f"{settings.path.name}: \"apiTokensFile\": {err}") from None
    return location


def build_engine(settings: Settings, location: ModelLocation) -> Engine:
    return engine_from_settings(settings, load_backend(settings, location))


def start_loading(runtime: Runtime, location: ModelLocation | None,
                  exit_on_failure: bool) -> None:
    """Start the remote models' engines, and load the local model (if any) on a native
    thread; the server answers /health meanwhile."""
    start_remotes(runtime)
    if location is None:
        return

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


def start_remotes(runtime: Runtime) -> None:
    """A started RemoteEngine per ``remoteEndpoints`` entry (each checks its endpoint at once;
    one that does not answer is ``unavailable`` until it does)."""
    settings = runtime.settings
    for upstream in upstreams_from_settings(settings):
        remote = RemoteEngine(upstream, queue_size=settings["queueSize"],
                              request_timeout=settings["requestTimeoutSeconds"],
                              queue_per_client=settings["queuePerClient"],
                              default_system_prompt=settings["systemPrompt"],
                              log_prompts=settings["enableModelDebugOutput"])
        remote.start()
        runtime.attach_remote(remote)


def configure_logging(settings: Settings) -> None:
    level = logging.DEBUG if settings["enableModelDebugOutput"] else logging.INFO
    if settings["logFormat"] == "json":
        logging.basicConfig(level=level, handlers=[json_handler()])
    else:
        logging.basicConfig(level=level,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class TangleboxServer(BaseApplication):
    """gunicorn, configured from settings, serving an app built inside the worker."""

    def __init__(self, settings: Settings, location: ModelLocation | None) -> None:
        self.settings = settings
        self.location = location
        self.crashes = WorkerCrashes()
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        config = {
            "bind": [f"[{s['host']}]:{s['port']}" if ":" in s["host"] else
                     f"{s['host']}:{s['port']}"],
            "worker_class": "gevent",
            "workers": 1,  # one worker per model: the model lives in the process
            # The guard (web/connection_limits.py) refuses past maxConnections, so the pool
            # always has room for /health and for those refusals.
            "worker_connections": s["maxConnections"] + CONNECTION_HEADROOM,
            "graceful_timeout": GRACEFUL_TIMEOUT_SECONDS,
            "timeout": 120,
            "loglevel": "warning",
            # No query string (no token) in the error log; JSON lines with logFormat json.
            "logger_class": gunicorn_logger_class(s),
            "accesslog": "-" if s["enableWebLogOutput"] else None,
            "access_log_format": ACCESS_LOG_FORMAT,
            "post_fork": self.crashes.post_fork,
            "post_worker_init": _drain_on_sigterm,
            "worker_exit": self._worker_exit,
            "child_exit": self.crashes.child_exit,
        }
        if s["useSsl"]:
            config["certfile"] = str(s.relative_path(s["sslCertFile"]))
            config["keyfile"] = str(s.relative_path(s["sslKeyFile"]))
            config["ssl_context"] = tls_context_or_stop
        for key, value in config.items():
            self.cfg.set(key, value)
        self._apply_gunicorn_cmd_args()

    def _apply_gunicorn_cmd_args(self) -> None:
        """gunicorn's own ``GUNICORN_CMD_ARGS`` (e.g. ``--graceful-timeout 60``) tunes the
        server as it would ``gunicorn``; the worker class and count stay ours."""
        if not os.environ.get("GUNICORN_CMD_ARGS"):
            return
        parsed = self.cfg.parser().parse_args(self.cfg.get_cmd_args_from_env())
        for key, value in vars(parsed).items():
            if value is None or key == "args":
                continue
            if key in PINNED_GUNICORN_SETTINGS:
                log.warning("GUNICORN_CMD_ARGS: %s is ignored: Tanglebox runs one gevent "
                            "worker per model (README: Deployment)", key)
                continue
            self.cfg.set(key.lower(), value)

    def _worker_exit(self, server, worker) -> None:
        self.crashes.worker_exit(server, worker)
        stop_engine(server, worker)

    def load(self):
        configure_logging(self.settings)
        app = create_app_or_stop(self.settings)
        start_loading(app.extensions["tanglebox"], self.location, exit_on_failure=True)
        return app


def create_app_or_stop(settings: Settings, runtime: Runtime | None = None) -> Flask:
    """The worker's app; a database it cannot use (unreachable, newer than this code) is one
    line and gunicorn's boot-error exit, so ``python app.py`` exits with status 2."""
    from tanglebox.database import DatabaseError
    from tanglebox.web import create_app
    try:
        return create_app(settings, runtime)
    except DatabaseError as err:
        print(f"tanglebox: error: {settings.path.name}: \"databaseUrl\": {err}",
              file=sys.stderr, flush=True)
        os._exit(WORKER_BOOT_ERROR)


def install_graceful_shutdown(worker, runtime: Runtime) -> None:
    """On SIGTERM, drain the engine within gunicorn's graceful timeout.

    gunicorn's gevent worker, told to stop, closes its listening socket and waits up to
    ``graceful_timeout`` for open connections, then kills them. So the engine at once refuses
    new replies (an open socket's next prompt is told the server is shutting down), lets
    running replies finish for ``graceful_timeout - DRAIN_MARGIN_SECONDS``, then ends the rest
    with finish reason ``shutdown``, which every surface renders as a clear message, while
    there is still time to send it.
    """
    previous = signal.getsignal(signal.SIGTERM)
    drain_seconds = max(1.0, worker.cfg.graceful_timeout - DRAIN_MARGIN_SECONDS)

    def on_sigterm(signum, frame) -> None:
        import gevent
        # A signal handler may interrupt a greenlet that holds the engine's lock: drain from
        # a fresh greenlet instead (as gunicorn's own gevent worker does with SIGQUIT).
        gevent.spawn(_start_drain, runtime, drain_seconds)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_sigterm)


def _start_drain(runtime: Runtime, drain_seconds: float) -> None:
    if runtime.engines():
        log.info("shutting down: finishing running replies (up to %g s)", drain_seconds)
    for engine in runtime.engines():
        engine.stop(drain_seconds=drain_seconds, wait=False)


def _drain_on_sigterm(worker) -> None:
    """gunicorn's post_worker_init hook (``python app.py``)."""
    install_graceful_shutdown(worker, worker.wsgi.extensions["tanglebox"])


def stop_engine(server, worker) -> None:
    """gunicorn's worker_exit hook: connections are done; end the engine's thread."""
    app = getattr(worker, "wsgi", None)
    runtime = app.extensions.get("tanglebox") if app is not None else None
    for engine in runtime.engines() if runtime is not None else []:
        engine.stop(drain_seconds=0)


def production_app():
    """For ``gunicorn -k gevent -w 1 'tanglebox.serving:production_app()'``.

    Reads settings.json from ``TANGLEBOX_SETTINGS`` (default: ./settings.json) and the
    ``TANGLEBOX_*`` environment variables.
    """
    from gunicorn.workers.base import Worker

    from tanglebox.self_check import run_self_check
    settings_path = os.environ.get("TANGLEBOX_SETTINGS", "settings.json")
    try:
        settings = load_settings(settings_path)
        location = preflight(settings)
        if location is not None and location.backend == "llama.cpp":
            announce(settings, run_self_check(settings_path, {}))
    except SettingsError as err:
        print(f"tanglebox: error: {err}", file=sys.stderr, flush=True)
        os._exit(WORKER_BOOT_ERROR)  # the master halts instead of restarting the worker
    configure_logging(settings)
    app = create_app_or_stop(settings)
    runtime = app.extensions["tanglebox"]
    # gunicorn calls this inside the worker, after the worker set its signal handlers; the
    # SIGTERM handler is the worker's bound method. (With --preload it would be the master:
    # the model must load in the worker, so that is refused in the docs, and skipped here.)
    worker = getattr(signal.getsignal(signal.SIGTERM), "__self__", None)
    if isinstance(worker, Worker):
        install_graceful_shutdown(worker, runtime)
    else:
        log.warning("not inside a gunicorn worker: SIGTERM will not drain running replies")
    start_loading(runtime, location, exit_on_failure=True)
    return app

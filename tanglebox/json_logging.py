"""Logs as one JSON object per line (``logFormat: json``), for log shippers and their queries.

Every line holds ``time`` (ISO 8601, UTC), ``level``, ``logger`` and ``message``, and an error's
traceback as ``exception``; an access line (``enableWebLogOutput``) adds ``method``, ``path``
(never its query string, where the original's clients send their token), ``status``,
``duration_ms``, ``remote_addr``, ``surface`` and ``model`` (the last two put in the request's
environ by the app: ``tanglebox.metrics``). Messages and tracebacks pass
``gunicorn_logging.scrub`` (no query string, ``token=`` value or Bearer/Basic credential), as
gunicorn's text error log does. Prompts and replies are in no line: only the engine logs them,
and only with ``enableModelDebugOutput``.

Three writers, one format:

- the app's loggers: :func:`json_handler` on the root logger (``serving.configure_logging``);
- gunicorn's error and access logs: :class:`JsonGunicornLogger`, gunicorn's ``logger_class``
  (:func:`gunicorn_logger_class`) for ``python app.py`` and ``tanglebox.gunicorn_conf``;
- ``python app.py``'s own lines before gunicorn starts: :func:`announce`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import datetime, timezone
from typing import Any

from tanglebox.gunicorn_logging import ScrubbingLogger, scrub
from tanglebox.metrics import MODEL_KEY, SURFACE_KEY
from tanglebox.settings import Settings

ACCESS_FIELDS = ("method", "path", "status", "duration_ms", "remote_addr", "surface", "model")


def log_entry(level: str, logger: str, message: str, created: float | None = None,
              **fields: Any) -> str:
    """One line: the JSON object of a log entry (ASCII only, so it is always one valid line)."""
    moment = datetime.fromtimestamp(time.time() if created is None else created, timezone.utc)
    entry = {"time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
             "level": level, "logger": logger, "message": scrub(message), **fields}
    return json.dumps(entry)


class JsonFormatter(logging.Formatter):
    """A record as :func:`log_entry`, with the access fields it carries."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {key: getattr(record, key) for key in ACCESS_FIELDS if hasattr(record, key)}
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["exception"] = scrub(record.exc_text)
        return log_entry(record.levelname, record.name, record.getMessage(), record.created,
                         **fields)


def json_handler() -> logging.Handler:
    """A stderr handler writing :class:`JsonFormatter` lines (for the root logger)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    return handler


class JsonGunicornLogger(ScrubbingLogger):
    """gunicorn's logger, its error and access lines as JSON objects."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(JsonFormatter())

    def access(self, resp, req, environ, request_time) -> None:
        if not self.access_log_enabled:
            return
        method, path = environ.get("REQUEST_METHOD", "-"), environ.get("PATH_INFO", "-")
        status = resp.status_code or str(resp.status).split(" ")[0]  # None: no valid status
        fields = {"method": method, "path": path, "status": status,
                  "duration_ms": round(request_time.total_seconds() * 1000, 1),
                  "remote_addr": environ.get("REMOTE_ADDR", "-"),
                  "surface": environ.get(SURFACE_KEY, ""), "model": environ.get(MODEL_KEY, "")}
        self.access_log.info("%s %s %s", method, path, status, extra=fields)


def gunicorn_logger_class(settings: Settings) -> type[ScrubbingLogger]:
    return JsonGunicornLogger if settings["logFormat"] == "json" else ScrubbingLogger


def announce(settings: Settings, message: str) -> None:
    """One of ``python app.py``'s own lines on stderr: ``tanglebox: ...``, or a JSON entry."""
    line = (log_entry("INFO", "tanglebox", message) if settings["logFormat"] == "json"
            else f"tanglebox: {message}")
    print(line, file=sys.stderr, flush=True)

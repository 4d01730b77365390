"""gunicorn settings for running Tanglebox under the ``gunicorn`` command (README: Deployment).

``gunicorn -c python:tanglebox.gunicorn_conf -b 127.0.0.1:8080 'tanglebox.serving:production_app()'``
gives the same stack as ``python app.py``: one gevent worker (the model lives in it), the
engine stopped when the worker exits, and the crash guard (``tanglebox.worker_crashes``): a
worker that keeps crashing stops the server with one line instead of being restarted forever,
as does one that cannot load ``--certfile``/``--keyfile``. Neither log shows a query string
(where the original's clients send their token): the access log (``--access-logfile``) writes
the path only, as ``python app.py`` does; with ``logFormat: json`` in the settings
(``TANGLEBOX_SETTINGS``), both logs are JSON lines (``tanglebox.json_logging``). gunicorn reads this module once, in the master,
before it forks the worker.
"""

import os

from tanglebox.gunicorn_logging import ScrubbingLogger
from tanglebox.json_logging import gunicorn_logger_class
from tanglebox.listener import tls_context_or_stop
from tanglebox.serving import ACCESS_LOG_FORMAT, GRACEFUL_TIMEOUT_SECONDS, stop_engine
from tanglebox.settings import SettingsError, load_settings
from tanglebox.worker_crashes import WorkerCrashes

worker_class = "gevent"
workers = 1  # one worker per model: the model lives in the process
graceful_timeout = GRACEFUL_TIMEOUT_SECONDS

def _logger_class() -> type[ScrubbingLogger]:
    """JSON lines when the settings' logFormat is json; a settings file with a mistake is
    reported by the worker (``production_app``), so here it only means text."""
    try:
        settings = load_settings(os.environ.get("TANGLEBOX_SETTINGS", "settings.json"),
                                 write_missing=False)
    except SettingsError:
        return ScrubbingLogger
    return gunicorn_logger_class(settings)


logger_class = _logger_class()
access_log_format = ACCESS_LOG_FORMAT
ssl_context = tls_context_or_stop

_crashes = WorkerCrashes()
post_fork = _crashes.post_fork
child_exit = _crashes.child_exit


def worker_exit(server, worker) -> None:
    _crashes.worker_exit(server, worker)
    stop_engine(server, worker)

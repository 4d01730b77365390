"""``logFormat: json``: gunicorn's error log and the app's loggers write one JSON object per
line, scrubbed of tokens; the ``gunicorn`` command takes the format from its settings. (The
live server's access and error lines: tests/integration/test_json_logs.py.)"""

from __future__ import annotations

import json
import logging

from tanglebox import gunicorn_conf
from tanglebox.gunicorn_logging import ScrubbingLogger
from tanglebox.json_logging import JsonFormatter, JsonGunicornLogger
from tests.conftest import write_settings
from tests.unit.test_gunicorn_logging import SECRET, GunicornCommand, log_a_token_in_every_way


def test_gunicorns_error_lines_are_json_objects_without_a_token(capsys):
    log_a_token_in_every_way(JsonGunicornLogger(GunicornCommand().cfg))
    lines = capsys.readouterr().err.splitlines()
    entries = [json.loads(line) for line in lines]
    assert [(e["level"], e["logger"]) for e in entries] == [("WARNING", "gunicorn.error"),
                                                           ("ERROR", "gunicorn.error")]
    assert entries[0]["message"].startswith("Invalid request from ip=127.0.0.1")
    assert "ValueError" in entries[1]["exception"]
    assert SECRET not in "\n".join(lines)


def test_an_app_log_record_is_one_json_line_with_its_traceback():
    try:
        raise RuntimeError("the model failed\nin two lines")
    except RuntimeError as err:
        record = logging.LogRecord("tanglebox.engine", logging.ERROR, __file__, 1,
                                   "a step failed: %s", (err,), exc_info=(type(err), err, None))
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["logger"] == "tanglebox.engine" and entry["level"] == "ERROR"
    assert entry["message"] == "a step failed: the model failed\nin two lines"
    assert "RuntimeError" in entry["exception"] and entry["time"].endswith("Z")


def test_the_gunicorn_command_takes_the_log_format_from_its_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("TANGLEBOX_LOG_FORMAT", raising=False)
    monkeypatch.setenv("TANGLEBOX_SETTINGS", str(write_settings(tmp_path, logFormat="json")))
    assert gunicorn_conf._logger_class() is JsonGunicornLogger
    monkeypatch.setenv("TANGLEBOX_SETTINGS", str(write_settings(tmp_path, logFormat="text")))
    assert gunicorn_conf._logger_class() is ScrubbingLogger

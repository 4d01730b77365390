"""gunicorn's error log hides query strings and credentials, under ``python app.py`` and under
``gunicorn -c python:tanglebox.gunicorn_conf`` (with a live request:
tests/integration/test_gunicorn_hooks.py)."""

from __future__ import annotations

import pytest
from gunicorn.app.base import Application

from tanglebox.gunicorn_logging import scrub
from tanglebox.serving import ACCESS_LOG_FORMAT

SECRET = "tbx_c2VjcmV0IHRva2Vu"


@pytest.mark.parametrize("message, scrubbed", [
    (f"Invalid HTTP request line: 'GET /conversation?userPrompt=hi&token={SECRET}\\x01 HTTP/1.1'",
     "Invalid HTTP request line: 'GET /conversation?[hidden] HTTP/1.1'"),
    (f"Invalid HTTP request line: \"GET /c?a='x&token={SECRET} HTTP/1.1\"",
     "Invalid HTTP request line: \"GET /c?[hidden] HTTP/1.1\""),
    (f"Invalid HTTP request line: 'GET /conversation token={SECRET} HTTP/1.1'",
     "Invalid HTTP request line: 'GET /conversation token=[hidden] HTTP/1.1'"),
    (f"Invalid HTTP request line: 'GET /conversation;TOKEN={SECRET} HTTP/1.1'",
     "Invalid HTTP request line: 'GET /conversation;TOKEN=[hidden] HTTP/1.1'"),
    (f"Invalid HTTP Header: 'Authorization Bearer {SECRET}'",
     "Invalid HTTP Header: 'Authorization Bearer [hidden]"),
    (f"Invalid HTTP Header: 'authorization: basic {SECRET}'",
     "Invalid HTTP Header: 'authorization: basic [hidden]"),
    (f"Error handling request GET /conversation?token={SECRET}",
     "Error handling request GET /conversation?[hidden]"),
])
def test_scrub_hides_every_way_a_token_reaches_a_gunicorn_message(message, scrubbed):
    assert scrub(message) == scrubbed


def test_a_message_without_a_query_is_unchanged():
    message = "Worker (pid:123) was sent SIGKILL! Perhaps out of memory?"
    assert scrub(message) == message


class GunicornCommand(Application):
    """gunicorn's configuration as ``gunicorn -c python:tanglebox.gunicorn_conf`` builds it."""

    def init(self, parser, opts, args):
        return None

    def load_config(self):
        self.load_config_from_module_name_or_filename("python:tanglebox.gunicorn_conf")

    def load(self):
        raise NotImplementedError  # nothing is served here


def test_the_gunicorn_command_writes_neither_log_with_a_query_string(capsys):
    cfg = GunicornCommand().cfg
    assert cfg.access_log_format == ACCESS_LOG_FORMAT and "%(U)s" in ACCESS_LOG_FORMAT
    assert not any(atom in ACCESS_LOG_FORMAT for atom in ("%(r)s", "%(q)s", "%({"))

    log_a_token_in_every_way(cfg.logger_class(cfg))
    log = capsys.readouterr().err
    assert "Invalid request from ip=127.0.0.1" in log and "ValueError" in log
    assert SECRET not in log


def log_a_token_in_every_way(logger) -> None:
    """A warning and a traceback, as gunicorn writes them, each with SECRET in a query."""
    logger.warning("Invalid request from ip=%s: %s", "127.0.0.1",
                   f"Invalid HTTP request line: 'GET /?token={SECRET}\\x01 HTTP/1.1'")
    try:
        raise ValueError(f"while reading /conversation?token={SECRET}")
    except ValueError:
        logger.exception("Error handling request /conversation?token=%s", SECRET)

"""gunicorn's error log, with query strings and credentials hidden.

gunicorn writes a request it cannot parse into its error log at WARNING, whatever the access
log says: ``Invalid request from ip=...: Invalid HTTP request line: 'GET
/conversation?token=tbx_... HTTP/1.1'``. The original's clients send their API token in the
query string, so that line would put a token in the log. Tanglebox's access log already
shows the path only (``serving.ACCESS_LOG_FORMAT``); :class:`ScrubbingLogger`, gunicorn's
``logger_class`` for ``python app.py`` and ``tanglebox.gunicorn_conf``, does the same for the
error log: every message (and traceback) loses what follows a ``?``, any ``token=`` value and
any ``Bearer``/``Basic`` credential before it is written.
"""

from __future__ import annotations

import logging
import re

from gunicorn import glogging

HIDDEN = "[hidden]"
# A query string runs to the next space: request lines and URLs in gunicorn's messages are
# shown with repr(), which escapes every other space-like byte. `token=` and credentials may
# also appear outside a query (a malformed request line, a header line without its colon).
_QUERY = re.compile(r"\?\S+")
_TOKEN_PARAMETER = re.compile(r"(?i)(token=)\S*")
_CREDENTIALS = re.compile(r"(?i)\b(bearer|basic)(\s+)\S+")


def scrub(text: str) -> str:
    """``text`` without query strings, ``token=`` values and Bearer/Basic credentials."""
    text = _QUERY.sub("?" + HIDDEN, text)
    text = _TOKEN_PARAMETER.sub(r"\g<1>" + HIDDEN, text)
    return _CREDENTIALS.sub(r"\g<1>\g<2>" + HIDDEN, text)


class ScrubbingFilter(logging.Filter):
    """Rewrites each record's message (and traceback text) through :func:`scrub`."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed call must still not leak its arguments
            message = f"{record.msg} {record.args}"
        record.msg, record.args = scrub(message), ()
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the scrubbed text is what they write.
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
        return True


class ScrubbingLogger(glogging.Logger):
    """gunicorn's logger with :class:`ScrubbingFilter` on its error log."""

    def setup(self, cfg) -> None:
        super().setup(cfg)
        # gunicorn calls setup again on reload; the error log is a process-wide logger.
        if not any(isinstance(f, ScrubbingFilter) for f in self.error_log.filters):
            self.error_log.addFilter(ScrubbingFilter())

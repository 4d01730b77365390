"""Bounded connections: a cap per client address and in total, and a deadline for bodies.

One gevent worker serves every connection from one pool (gunicorn's ``worker_connections``,
``maxConnections`` plus ``serving.CONNECTION_HEADROOM``). Issue 14 filled it with 1,000
connections that sent headers announcing a body and then a few bytes of it: the body was read
with no deadline, so the pool stayed full and even ``/health`` went unanswered. This WSGI middleware
stands in front of the app::

    request (gunicorn gave the connection ``keepalive`` seconds, 2 by default, for its headers)
      ├─ /health                          served, whatever the counts (monitoring must see in)
      ├─ this address holds maxConnectionsPerClient requests or sockets,
      │  or the server holds maxConnections     → 503 + Retry-After, nothing read; a websocket
      │                                            handshake is refused before the upgrade
      ├─ a body: read whole within requestReadTimeoutSeconds, at most maxRequestBytes
      │     too slow → 408; malformed (a bad chunk size) → 400; too big when chunked → 413
      └─ the app, with the body from memory; the request's place is free when its response is
         closed (a socket's, when the socket ends)

A refused request's unread body is never waited for: gunicorn discards what is left of it
within its ``keepalive`` deadline, then drops the connection. Clients are told apart by the
address that connects (behind a reverse proxy that is the proxy: set the proxy's own limits,
README: Limits).
"""

from __future__ import annotations

import collections
import io
import threading
from dataclasses import dataclass
from typing import Callable, Iterable

import gevent
from gunicorn.http.errors import ParseException
from werkzeug.wrappers import Response
from werkzeug.wsgi import ClosingIterator

BUSY_RETRY_AFTER = 5
READ_CHUNK = 65536
EXEMPT_PATHS = ("/health",)

WsgiApp = Callable[[dict, Callable], Iterable[bytes]]


@dataclass(frozen=True)
class ConnectionLimits:
    total: int  # maxConnections
    per_client: int  # maxConnectionsPerClient
    read_timeout: float  # requestReadTimeoutSeconds
    max_body: int  # maxRequestBytes


class ConnectionGuard:
    """The middleware (see the module); ``counts()`` says who holds how many places."""

    def __init__(self, app: WsgiApp, limits: ConnectionLimits) -> None:
        self.app = app
        self.limits = limits
        self._by_client: collections.Counter[str] = collections.Counter()
        self._total = 0
        self._lock = threading.Lock()

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in EXEMPT_PATHS:
            return self.app(environ, start_response)
        client = environ.get("REMOTE_ADDR") or ""
        if not self._take(client):
            return _plain(503, "The server has too many connections open (from this address, "
                               "or in all); try again in a few seconds.",
                          {"Retry-After": str(BUSY_RETRY_AFTER)})(environ, start_response)
        try:
            refusal = self._read_body(environ)
            response = (refusal or self.app)(environ, start_response)
        except BaseException:  # StopIteration included: Flask-Sock ends a socket with it
            self._give_back(client)
            raise
        return ClosingIterator(response, lambda: self._give_back(client))

    def counts(self) -> tuple[int, dict[str, int]]:
        with self._lock:
            return self._total, dict(self._by_client)

    def _take(self, client: str) -> bool:
        with self._lock:
            if self._total >= self.limits.total or (
                    self._by_client[client] >= self.limits.per_client):
                return False
            self._total += 1
            self._by_client[client] += 1
            return True

    def _give_back(self, client: str) -> None:
        with self._lock:
            self._total -= 1
            self._by_client[client] -= 1
            if not self._by_client[client]:
                del self._by_client[client]

    def _read_body(self, environ: dict) -> WsgiApp | None:
        """Read the body into memory within the deadline; an answer instead when it fails."""
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0  # gunicorn refuses a malformed Content-Length before we see it
        if not chunked and (length <= 0 or length > self.limits.max_body):
            return None  # nothing to read, or the app's 413 without reading it
        stream = environ["wsgi.input"]
        limit = length if not chunked else self.limits.max_body + 1
        body = bytearray()
        try:
            with gevent.Timeout(self.limits.read_timeout):
                while len(body) < limit:
                    data = stream.read(min(READ_CHUNK, limit - len(body)))
                    if not data:
                        break
                    body += data
        except gevent.Timeout:
            return _plain(408, f"The request body did not arrive within "
                               f"{self.limits.read_timeout:g} seconds.")
        except (ParseException, OSError, ValueError):
            return _plain(400, "The request body could not be read (a malformed chunked "
                               "encoding, or the client left).")
        if len(body) > self.limits.max_body:
            return _plain(413, "The request body is larger than the server's maxRequestBytes.")
        environ["wsgi.input"] = io.BytesIO(bytes(body))
        environ["CONTENT_LENGTH"] = str(len(body))
        environ.pop("HTTP_TRANSFER_ENCODING", None)
        environ["wsgi.input_terminated"] = True
        return None


def _plain(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(message + "\n", status=status, mimetype="text/plain", headers=headers)

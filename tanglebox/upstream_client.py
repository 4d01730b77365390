"""HTTP to a remote OpenAI-compatible engine: a keep-alive connection pool and an SSE reader.

A :class:`RemoteEngine` (``remote_engine.py``) opens one :class:`ChatStream` per reply::

    UpstreamClient.stream().open(path, body, deadline) ──► POST {baseUrl}{path}, stream=true
        ChatStream.chunks(deadline)    each ``data:`` JSON object as it arrives (no buffering)
        ChatStream.finish()            after ``[DONE]``: the connection goes back to the pool
        ChatStream.close()             at once, from anywhere (cancel): the socket is shut down,
                                       so a read blocked on it returns, and it is not reused

Plain ``http.client`` on purpose: under gunicorn's gevent worker its sockets are gevent's, so a
stream waits in a greenlet, not on a thread, and with no gevent (tests) it waits on a thread.
Every wait has a deadline: the endpoint's ``timeoutSeconds`` for connecting and between two
reads, and the reply's own ``requestTimeoutSeconds`` overall.

A failure is an :class:`UpstreamError` whose ``detail`` is for the operator's log and
``/health`` (never the key); what a user is told is decided by the engine.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping
from urllib.parse import urlsplit

from tanglebox.settings import Settings, SettingsError

DEFAULT_MAX_CONCURRENT = 4
DEFAULT_TIMEOUT_SECONDS = 60
MAX_LINE_BYTES = 1024 * 1024  # one SSE line; a longer one is not a chat chunk
MAX_ERROR_BODY_BYTES = 4096  # read of an error reply, to log its first line


@dataclass(frozen=True)
class Upstream:
    """One ``remoteEndpoints`` entry, with its key read from the environment at start."""

    name: str  # the model's id here
    base_url: str  # up to and including /v1
    model: str  # the model's name upstream
    api_key_env: str = ""
    api_key: str = field(default="", repr=False)
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    timeout: float = DEFAULT_TIMEOUT_SECONDS


def upstreams_from_settings(settings: Settings,
                            environ: Mapping[str, str] | None = None) -> list[Upstream]:
    """The configured endpoints; a SettingsError when a named key variable is not set."""
    environ = os.environ if environ is None else environ
    upstreams = []
    for index, entry in enumerate(settings["remoteEndpoints"]):
        key_env = entry.get("apiKeyEnv", "")
        if key_env and not environ.get(key_env):
            raise SettingsError(f"{settings.path.name}: \"remoteEndpoints\"[{index}].apiKeyEnv "
                                f"names {key_env}, which is not set in the environment (it "
                                "must hold the endpoint's API key)")
        upstreams.append(Upstream(
            name=entry["name"], base_url=entry["baseUrl"].rstrip("/"),
            model=entry.get("model", entry["name"]), api_key_env=key_env,
            api_key=environ.get(key_env, "") if key_env else "",
            max_concurrent=entry.get("maxConcurrent", DEFAULT_MAX_CONCURRENT),
            timeout=float(entry.get("timeoutSeconds", DEFAULT_TIMEOUT_SECONDS))))
    return upstreams


class UpstreamError(Exception):
    """A call that failed; ``detail`` is for the operator (no key in it)."""

    def __init__(self, detail: str, status: int | None = None, connect: bool = False,
                 timed_out: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status  # the upstream's HTTP status, when it answered with an error
        self.connect = connect  # no connection could be made (or it broke before any answer)
        self.timed_out = timed_out

    @property
    def bad_key(self) -> bool:
        return self.status in (401, 403)


class UpstreamClient:
    """Connections to one upstream, kept alive and reused (at most ``max_concurrent`` idle)."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        parts = urlsplit(upstream.base_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port or (443 if self._https else 80)
        self._prefix = parts.path.rstrip("/")
        self._idle: list[http.client.HTTPConnection] = []

    def headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.upstream.api_key:
            headers["Authorization"] = f"Bearer {self.upstream.api_key}"
        return headers

    def get_json(self, path: str, timeout: float) -> Any:
        """GET ``path`` (below the base URL) and decode its JSON; raises UpstreamError."""
        connection = self._connection(timeout)
        try:
            response = self._send(connection, "GET", path, None, timeout)
            _raise_for_status(response, self.upstream)
            try:
                return json.loads(response.read())
            except ValueError:
                raise UpstreamError(f"malformed JSON from GET {path}") from None
        except (OSError, http.client.HTTPException) as err:
            raise _network_error(err, "GET " + path) from None
        finally:
            connection.close()

    def stream(self) -> ChatStream:
        """A stream to :meth:`ChatStream.open`; it can be closed before it opens."""
        return ChatStream(self)

    def give_back(self, connection: http.client.HTTPConnection) -> None:
        if len(self._idle) < self.upstream.max_concurrent and connection.sock is not None:
            self._idle.append(connection)
        else:
            connection.close()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()

    def _connection(self, timeout: float, reuse: bool = True) -> http.client.HTTPConnection:
        if reuse and self._idle:
            return self._idle.pop()
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=timeout,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _send(self, connection: http.client.HTTPConnection, method: str, path: str,
              data: bytes | None, timeout: float) -> http.client.HTTPResponse:
        if connection.sock is not None:
            connection.sock.settimeout(timeout)
        else:
            connection.timeout = timeout
        connection.request(method, self._prefix + path, body=data, headers=self.headers())
        return connection.getresponse()


class ChatStream:
    """One streamed reply; see the module."""

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client
        self._connection: http.client.HTTPConnection | None = None
        self._response: http.client.HTTPResponse | None = None
        self._sock: socket.socket | None = None
        self.closed = False

    def open(self, path: str, body: dict[str, Any], deadline: float) -> None:
        """POST a streamed request; raises UpstreamError before any answer came (returns
        quietly once :meth:`close` was called)."""
        client = self._client
        timeout = _remaining(deadline, client.upstream.timeout)
        data = json.dumps(body).encode("utf-8")
        for reused in (True, False):
            connection = self._connection = client._connection(timeout, reuse=reused)
            try:
                if connection.sock is None:
                    connection.connect()
                self._sock = connection.sock
                if self.closed:
                    break
                self._response = client._send(connection, "POST", path, data, timeout)
            except (OSError, http.client.HTTPException) as err:
                connection.close()
                if self.closed:
                    return
                if reused and _stale(err):
                    continue  # a kept-alive connection the upstream had closed: nothing ran
                raise _network_error(err, "POST " + path) from None
            try:
                _raise_for_status(self._response, client.upstream)
            except BaseException:
                connection.close()
                raise
            return
        connection.close()

    def chunks(self, deadline: float) -> Iterator[dict[str, Any]]:
        """Each ``data:`` object until ``[DONE]``; raises UpstreamError (timed_out for a
        stall), or returns early once :meth:`close` was called."""
        data: list[bytes] = []
        while not self.closed:
            line = self._readline(deadline)
            if self.closed:
                return
            if not line:
                raise UpstreamError("the upstream closed the stream before the end of the reply")
            line = line.rstrip(b"\r\n")
            if line.startswith(b"data:"):
                data.append(line[5:].strip())
                continue
            if line or not data:  # a comment, an event name, a keep-alive blank line
                continue
            payload, data = b"\n".join(data), []
            if payload == b"[DONE]":
                return
            try:
                chunk = json.loads(payload)
            except ValueError:
                raise UpstreamError("malformed JSON in the stream") from None
            if not isinstance(chunk, dict):
                raise UpstreamError("a stream chunk that is not a JSON object")
            if "error" in chunk:
                raise UpstreamError(f"the upstream ended the stream with an error: "
                                    f"{_first_line(json.dumps(chunk['error']))}")
            yield chunk

    def finish(self) -> None:
        """After ``[DONE]``: read the rest of the response, reuse the connection."""
        if self._connection is None or self._response is None:
            return
        try:
            self._response.read()
        except (OSError, http.client.HTTPException):
            self._connection.close()
            return
        if self._response.will_close:
            self._connection.close()
        else:
            self._client.give_back(self._connection)

    def close(self) -> None:
        """Stop now: a reader blocked in :meth:`chunks` returns at once."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._sock is not None:
                self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def discard(self) -> None:
        self.closed = True
        if self._connection is not None:
            self._connection.close()

    def _readline(self, deadline: float) -> bytes:
        timeout = _remaining(deadline, self._client.upstream.timeout)
        try:
            if self._sock is not None:
                self._sock.settimeout(timeout)
            return self._response.readline(MAX_LINE_BYTES)
        except (socket.timeout, TimeoutError):
            if self.closed:
                return b""
            raise UpstreamError(f"no data from the upstream for {timeout:.3g} s",
                                timed_out=True) from None
        except (OSError, ValueError, http.client.HTTPException) as err:
            if self.closed:
                return b""
            raise UpstreamError(f"the stream broke: {_first_line(str(err)) or type(err).__name__}"
                                ) from None


def _remaining(deadline: float, timeout: float) -> float:
    return max(0.001, min(timeout, deadline - time.monotonic()))


def _raise_for_status(response: http.client.HTTPResponse, upstream: Upstream) -> None:
    if response.status < 400:
        return
    try:
        text = response.read(MAX_ERROR_BODY_BYTES).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException):
        text = ""
    if response.status in (401, 403):
        hint = (f"check apiKeyEnv {upstream.api_key_env}" if upstream.api_key_env
                else "it wants a key: set apiKeyEnv")
        raise UpstreamError(f"{response.status} from upstream: {hint}", status=response.status)
    raise UpstreamError(f"{response.status} from upstream: {_first_line(text) or response.reason}",
                        status=response.status)


def _network_error(err: BaseException, what: str) -> UpstreamError:
    if isinstance(err, (socket.timeout, TimeoutError)):
        return UpstreamError(f"{what}: no answer in time", connect=True, timed_out=True)
    if isinstance(err, ConnectionRefusedError):
        return UpstreamError("connection refused", connect=True)
    if isinstance(err, socket.gaierror):
        return UpstreamError(f"unknown host ({err.strerror})", connect=True)
    if isinstance(err, ssl.SSLError):
        return UpstreamError(f"TLS failed: {err.reason or err}", connect=True)
    return UpstreamError(f"{what}: {_first_line(str(err)) or type(err).__name__}", connect=True)


def _stale(err: BaseException) -> bool:
    return isinstance(err, (http.client.RemoteDisconnected, ConnectionResetError,
                            BrokenPipeError, http.client.BadStatusLine))


def _first_line(text: str, limit: int = 200) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line[:limit]

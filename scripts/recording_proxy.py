"""A loopback HTTP proxy that records what a client sends to an OpenAI-compatible server.

``RecordingProxy(upstream).start()`` listens on a free loopback port; a client pointed at
``proxy.url + "/v1"`` reaches the upstream server unchanged, and every exchange is kept as an
:class:`Exchange` (method, path, the request's JSON body, the status, the response's type, how
many SSE ``data:`` events came back and whether ``[DONE]`` ended them). Responses are relayed
piece by piece as the upstream sends them (re-chunked, ``Connection: close``), so a stream stays
a stream for the client. The ``Authorization`` header is recorded as its scheme only.

It exists to answer "what does this client really send to /v1, and did the reply stream?"
without adding logging to the server itself (``enableWebLogOutput`` logs paths, not bodies).
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# headers that describe one hop, not the message (RFC 9110 section 7.6.1), plus the length,
# which the relay replaces by chunking
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "transfer-encoding", "upgrade", "content-length", "host"}
EXCERPT_CHARS = 2000
UPSTREAM_TIMEOUT = 600.0  # a long reply on a slow CPU; a bound for failing, not a speed goal


@dataclass
class Exchange:
    method: str
    path: str
    request_headers: dict[str, str]
    request_body: Any
    status: int = 0
    content_type: str = ""
    pieces: int = 0  # reads from the upstream that returned data: more than one means it streamed
    sse_events: int = 0
    sse_done: bool = False
    first_byte_s: float | None = None
    last_byte_s: float | None = None
    response_excerpt: str = ""
    error: str = ""
    finished: bool = False
    body_text: str = field(default="", repr=False)

    def summary(self) -> str:
        """One line: what was asked and what came back."""
        body = self.request_body if isinstance(self.request_body, dict) else {}
        asked = f" stream={body.get('stream')!r} fields={sorted(body)}" if body else ""
        shape = self.content_type.split(";")[0] or "-"
        if self.sse_events:
            shape += f", {self.sse_events} data events{' + [DONE]' if self.sse_done else ''}"
        spread = ""
        if self.first_byte_s is not None and self.last_byte_s is not None:
            spread = f", {self.pieces} pieces over {self.last_byte_s - self.first_byte_s:.2f} s"
        failure = f" ({self.error})" if self.error else ""
        failure += "" if self.finished else " (no answer yet)"
        return f"{self.method} {self.path}{asked} -> {self.status} {shape}{spread}{failure}"


class RecordingProxy:
    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "RecordingProxy":
        proxy = self

        class Handler(_RelayHandler):
            recorder = proxy

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, name="recording-proxy",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def record(self, exchange: Exchange) -> None:
        with self._lock:
            self.exchanges.append(exchange)

    def wait_until_answered(self, timeout: float) -> list[Exchange]:
        """Poll until every request so far has its whole answer; those still open after
        ``timeout`` seconds are returned (none: all answered)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                unanswered = [e for e in self.exchanges if not e.finished]
            if not unanswered or time.monotonic() > deadline:
                return unanswered
            time.sleep(0.1)  # polling interval, not a fixed wait

    def to_jsonl(self, path: Path) -> None:
        """Write every exchange as one JSON object a line (the full bodies, keys unredacted)."""
        with self._lock, open(path, "w", encoding="utf-8") as out:
            for exchange in self.exchanges:
                out.write(json.dumps(asdict(exchange)) + "\n")


class _RelayHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    recorder: RecordingProxy

    def log_message(self, format: str, *args: Any) -> None:  # the exchanges are the log
        pass

    def do_GET(self) -> None:
        self._relay()

    def do_POST(self) -> None:
        self._relay()

    def do_DELETE(self) -> None:
        self._relay()

    def do_OPTIONS(self) -> None:
        self._relay()

    def _relay(self) -> None:
        body = self._read_body()
        exchange = Exchange(self.command, self.path, _recorded_headers(self.headers),
                            _parsed(body))
        self.recorder.record(exchange)
        upstream = http.client.HTTPConnection(self.recorder.upstream_host,
                                              self.recorder.upstream_port,
                                              timeout=UPSTREAM_TIMEOUT)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            exchange.status = response.status
            exchange.content_type = response.getheader("Content-Type", "")
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP:
                    self.send_header(name, value)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            self._relay_pieces(response, exchange)
        except OSError as error:  # the upstream went away, or the client did
            exchange.error = f"{type(error).__name__}: {error}"
        finally:
            upstream.close()
            self.close_connection = True
            _describe_body(exchange)
            exchange.finished = True

    def _relay_pieces(self, response: http.client.HTTPResponse, exchange: Exchange) -> None:
        started = time.monotonic()
        received = bytearray()
        try:
            while piece := response.read1(65536):
                now = time.monotonic() - started
                if exchange.first_byte_s is None:
                    exchange.first_byte_s = now
                exchange.last_byte_s = now
                exchange.pieces += 1
                received += piece
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        finally:  # also when the client went away mid-stream: what it was sent until then
            exchange.body_text = received.decode("utf-8", errors="replace")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = bytearray()
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return bytes(body)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


def _recorded_headers(headers: Any) -> dict[str, str]:
    recorded = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
    if "Authorization" in recorded:  # the scheme says how the key travels; the key stays out
        recorded["Authorization"] = recorded["Authorization"].split(" ")[0] + " <redacted>"
    return recorded


def _parsed(body: bytes) -> Any:
    if not body:
        return None
    try:
        return json.loads(body)
    except ValueError:
        return body[:EXCERPT_CHARS].decode("utf-8", errors="replace")


def _describe_body(exchange: Exchange) -> None:
    text = exchange.body_text
    exchange.response_excerpt = text[:EXCERPT_CHARS]
    if exchange.content_type.startswith("text/event-stream"):
        events = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        exchange.sse_done = bool(events) and events[-1] == "[DONE]"
        exchange.sse_events = len(events) - exchange.sse_done

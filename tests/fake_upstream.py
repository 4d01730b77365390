"""A stdlib OpenAI-compatible upstream on 127.0.0.1 that misbehaves on cue, for remote-model tests.

Use::

    with FakeUpstream(key="sk-test") as upstream:      # a free port; up at once
        upstream.base_url                               # "http://127.0.0.1:PORT/v1"
        upstream.pieces = ["The", " capital", "."]      # the reply's SSE deltas (default: 3 pieces)
        upstream.finish_reason = "length"               # the last chunk's (default "stop")
        upstream.usage = {...} or None                  # the usage chunk (None: sent none)
        upstream.mode = "ok"                            # what POST .../chat/completions does:
            # "ok"          stream ``pieces``, the usage chunk, then ``data: [DONE]``
            # "status"      answer ``status`` (e.g. 500, 400) with an OpenAI error body
            # "malformed"   a 200 stream whose first data line is not JSON
            # "error_chunk" the first piece, then ``data: {"error": ...}`` (as Tanglebox does)
            # "die"         the first ``die_after`` pieces (default 1), then close the socket
            # "stall"       the first ``stall_after`` pieces (default 0), then send nothing
            #               until ``release`` is set (then the rest, as "ok") or the
            #               client goes away
        upstream.status = 500                           # for mode "status"
        upstream.delay = 0.0                            # seconds between two pieces
        upstream.close_idle = False                     # True: close each connection after its
                                                        # reply without saying so (a keep-alive
                                                        # timeout passed upstream)
        upstream.down() / upstream.up()                 # close the port (connection refused),
                                                        # open it again on the same port
        upstream.requests                               # each POST's JSON body, in order
        upstream.paths                                  # each request's "METHOD /path"
        upstream.connections                            # TCP connections accepted so far
        upstream.client_gone                            # threading.Event: a client left a
                                                        # stream before its end (cancel reached it)

A request without ``Authorization: Bearer <key>`` (when ``key`` is set) is answered 401, the
models list (``GET /v1/models``) included. Streams are HTTP/1.1 chunked with keep-alive, so a
client can reuse its connection.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

POLL_SECONDS = 0.02


class FakeUpstream:
    def __init__(self, key: str = "", model: str = "fake-model") -> None:
        self.key = key
        self.model = model
        self.pieces: list[str] = ["Hello", ", ", "world"]
        self.finish_reason = "stop"
        self.usage: dict[str, Any] | None = {"prompt_tokens": 11, "completion_tokens": 3,
                                             "total_tokens": 14}
        self.mode = "ok"
        self.status = 500
        self.delay = 0.0
        self.close_idle = False
        self.die_after = 1
        self.stall_after = 0
        self.release = threading.Event()
        self.client_gone = threading.Event()
        self.requests: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self.connections = 0
        self.port = 0
        self._server: ThreadingHTTPServer | None = None
        self.up()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def up(self) -> None:
        handler = type("Handler", (_Handler,), {"upstream": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, args=(POLL_SECONDS,),
                         daemon=True).start()

    def down(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def stop(self) -> None:
        self.release.set()
        self.down()

    def __enter__(self) -> "FakeUpstream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    upstream: FakeUpstream
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.upstream.connections += 1

    def log_message(self, format: str, *args: Any) -> None:  # quiet in test output
        pass

    def do_GET(self) -> None:
        self.upstream.paths.append(f"GET {self.path}")
        if not self._authorized():
            return
        if self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.upstream.model,
                                                           "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        up = self.upstream
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        up.paths.append(f"POST {self.path}")
        up.requests.append(body)
        if not self._authorized():
            return
        if up.mode == "status":
            self._json(up.status, {"error": {"message": "upstream says no", "type": "x"}})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if up.mode == "malformed":
            self._event("{not json")
            self._end_chunks()
            return
        count = {"die": up.die_after, "stall": up.stall_after,
                 "error_chunk": 1}.get(up.mode, len(up.pieces))
        for piece in up.pieces[:count]:
            if up.delay and self._gone_within(up.delay):
                return
            self._event(json.dumps(self._chunk(piece, None)))
        if up.mode == "die":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if up.mode == "stall":
            while not up.release.is_set():
                if self._gone_within(POLL_SECONDS):
                    return
            for piece in up.pieces[count:]:
                self._event(json.dumps(self._chunk(piece, None)))
        if up.mode == "error_chunk":
            self._event(json.dumps({"error": {"message": "the model failed"}}))
            self._end_chunks()
            return
        self._event(json.dumps(self._chunk(None, up.finish_reason)))
        if up.usage is not None:
            self._event(json.dumps({"id": "x", "object": "chat.completion.chunk",
                                    "choices": [], "usage": up.usage}))
        self._event("[DONE]")
        self._end_chunks()
        if up.close_idle:
            self.close_connection = True

    def _chunk(self, text: str | None, finish_reason: str | None) -> dict[str, Any]:
        delta = {"content": text} if text is not None else {}
        if self.path.endswith("/completions") and not self.path.endswith("chat/completions"):
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {"id": "x", "object": "chat.completion.chunk", "model": self.upstream.model,
                "choices": [choice]}

    def _gone_within(self, seconds: float) -> bool:
        """Wait ``seconds``; True (and ``client_gone`` set) if the client closed meanwhile."""
        readable, _, _ = select.select([self.connection], [], [], seconds)
        if readable:
            try:
                gone = self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                gone = True
            if gone:
                self.upstream.client_gone.set()
                self.close_connection = True
                return True
            time.sleep(seconds)
        return False

    def _event(self, data: str) -> None:
        payload = f"data: {data}\n\n".encode()
        try:
            self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            self.wfile.flush()
        except OSError:
            self.upstream.client_gone.set()
            self.close_connection = True

    def _end_chunks(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _authorized(self) -> bool:
        key = self.upstream.key
        if key and self.headers.get("Authorization") != f"Bearer {key}":
            self._json(401, {"error": {"message": "Incorrect API key provided: sk-...",
                                       "code": "invalid_api_key"}})
            return False
        return True

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

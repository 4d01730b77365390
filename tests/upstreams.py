"""Upstreams for the remote-engine tests (issue 16): real engines, and a fake one that
misbehaves on cue, each on a free loopback port, each a context manager that stops it.

- ``tanglebox_upstream``: a second Tanglebox (the real gunicorn server) on the embedded model,
  tokens required, so the front's ``apiKeyEnv`` travels for real.
- ``llama_cpp_upstream``: llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``)
  on the same GGUF file; ready when ``/v1/models`` answers (it has no ``/health``).
- ``front_server``: a Tanglebox with no local model (``modelName: ""``) whose
  ``remoteEndpoints`` are the models it serves; ``env`` holds the keys its endpoints name.
- ``fake_upstream``: an OpenAI-compatible stdlib HTTP server in this process. It answers the
  ``Cue`` set on it: a reply, an HTTP error, malformed JSON, a stream dropped mid-reply (the
  connection closed with the chunked body unfinished: what the front sees of a killed
  process), no answer at all (slow), or an endless stream that notices when the front closes
  it (cancel). It records every request it got, and whether the key it got was right.

Readiness is polled with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from bench.servers import free_port, stop_process_group
from tanglebox.model_location import embedded_model_path
from tests.live_server import ROOT, LiveServer, wait_until

UPSTREAM_MODEL = "SmolLM2-135M-Instruct"  # the id a Tanglebox on the embedded model serves
UPSTREAM_TOKEN = "tbx_upstream-key-5f1e2d3c4b5a6978"  # the upstream Tanglebox's API token
LLAMA_CPP_ALIAS = "smollm2-llama-cpp"  # the model id llama_cpp.server answers to
READY_TIMEOUT = 180.0  # seconds a real engine may take to load and answer


def endpoint(name: str, url: str, **fields: Any) -> dict[str, Any]:
    """One ``remoteEndpoints`` entry for an upstream at ``url`` (its ``/v1`` is added)."""
    return {"name": name, "baseUrl": url + "/v1", **fields}


@contextmanager
def tanglebox_upstream(folder: Path, **settings: Any) -> Iterator[LiveServer]:
    """A Tanglebox on the embedded model that wants ``UPSTREAM_TOKEN`` on every API call."""
    (folder / "apiTokens.txt").write_text(f"front:{UPSTREAM_TOKEN}\n", encoding="utf-8")
    server = LiveServer(folder)
    try:
        yield server.start(isApiTokensRequired=True, **settings)
    finally:
        server.stop()


@contextmanager
def front_server(folder: Path, endpoints: list[dict[str, Any]], env: dict[str, str] | None = None,
                 **settings: Any) -> Iterator[LiveServer]:
    """A Tanglebox serving only ``endpoints``; ``env`` is in its environment (their keys)."""
    server = LiveServer(folder)
    try:
        with pytest.MonkeyPatch.context() as patch:  # the server process inherits os.environ
            for name, value in (env or {}).items():
                patch.setenv(name, value)
            server.start(modelName="", remoteEndpoints=endpoints, **settings)
        yield server
    finally:
        server.stop()


class LlamaCppServer:
    """``python -m llama_cpp.server`` on the embedded GGUF file, in its own process group."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = folder / "llama_cpp_server.log"
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(embedded_model_path()),
             "--model_alias", LLAMA_CPP_ALIAS, "--host", "127.0.0.1", "--port", str(self.port),
             "--n_ctx", "2048"],
            cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"llama_cpp.server exited with {self.process.returncode}:\n"
                               f"{self.log_path.read_text(errors='replace')}")
        try:
            return requests.get(self.url + "/v1/models", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        stop_process_group(self.process)
        self._log.close()


@contextmanager
def llama_cpp_upstream(folder: Path) -> Iterator[LlamaCppServer]:
    server = LlamaCppServer(folder)
    try:
        wait_until(server.ready, READY_TIMEOUT, "llama_cpp.server answers /v1/models")
        yield server
    finally:
        server.stop()


# -- the fake upstream -----------------------------------------------------------------------

FAKE_MODEL = "fake-upstream-model"
FAKE_REPLY = "The fake upstream answers in seven words."
TRICKLE_SECONDS = 0.05  # the endless stream's pace: it notices a closed connection this soon
HOLD_LIMIT = 120.0  # seconds a held or endless answer lasts at most, should a test forget it


@dataclass
class Cue:
    """How the fake answers chat completions, from now until the next cue."""

    text: str = FAKE_REPLY  # streamed word by word
    status: int = 200  # another status: an OpenAI-style error object with it
    body: bytes | None = None  # a raw body (status 200) instead of a completion
    content_type: str = "application/json"  # the raw body's
    cut_after: int | None = None  # stream this many words, then drop the connection
    hold: bool = False  # answer nothing until ``release()`` (a stuck upstream)
    endless: bool = False  # stream words until the front closes the connection


@dataclass
class FakeUpstream:
    port: int
    key: str | None = None  # the key it wants (``Authorization: Bearer``), None: any
    cue: Cue = field(default_factory=Cue)
    requests: list[dict[str, Any]] = field(default_factory=list)  # chat bodies, in order
    wrong_keys: int = 0  # calls refused for their key
    stream_closed: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self, cue: Cue | None = None) -> None:
        self.cue = cue or Cue()
        self.requests.clear()
        self.stream_closed.clear()
        self.released.clear()

    def release(self) -> None:
        self.released.set()


class _FakeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real engines serve
    server: "_FakeHTTPServer"

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test's output stays readable

    def do_GET(self) -> None:
        if not self._key_accepted():
            return
        if self.path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [
                {"id": FAKE_MODEL, "object": "model", "created": 0, "owned_by": "fake"}]})
        else:
            self._json(404, _error("not found", "invalid_request_error"))

    def do_POST(self) -> None:
        fake = self.server.fake
        request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
        if not self._key_accepted():
            return
        fake.requests.append(request)
        cue = fake.cue
        if cue.hold:
            fake.released.wait(HOLD_LIMIT)
        if cue.status != 200:
            self._json(cue.status, _error(f"the fake upstream answers {cue.status}",
                                          "server_error"))
        elif cue.body is not None:
            self._send(200, cue.content_type, cue.body)
        elif request.get("stream"):
            self._stream(request, cue)
        else:
            self._json(200, _completion(request, cue.text))

    def _key_accepted(self) -> bool:
        fake = self.server.fake
        given = self.headers.get("Authorization", "").removeprefix("Bearer ")
        if fake.key is None or given == fake.key:
            return True
        fake.wrong_keys += 1
        # As OpenAI's own 401 does: the key shown masked, never whole.
        self._json(401, _error(f"Incorrect API key provided: {given[:3]}***{given[-4:]}",
                               "invalid_request_error"))
        return False

    def _stream(self, request: dict[str, Any], cue: Cue) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._event(_chunk({"role": "assistant", "content": ""}))
        words = cue.text.split(" ")
        deadline = time.monotonic() + HOLD_LIMIT
        for index in range(10**9 if cue.endless else len(words)):
            if cue.cut_after is not None and index == cue.cut_after:
                return self._drop()
            word = "tick" if cue.endless else words[index]
            try:
                self._event(_chunk({"content": word if index == 0 else " " + word}))
            except OSError:  # the front closed the stream: what a cancel must do
                self.server.fake.stream_closed.set()
                self.close_connection = True
                return
            if cue.endless:
                if time.monotonic() > deadline:
                    return self._drop()
                time.sleep(TRICKLE_SECONDS)  # the endless stream's pace, not a wait in a test
        self._event(_chunk({}, finish_reason="stop"))
        if (request.get("stream_options") or {}).get("include_usage"):
            self._event({**_chunk({}), "choices": [], "usage": _usage(cue.text)})
        self._event("[DONE]")
        self.wfile.write(b"0\r\n\r\n")

    def _event(self, data: dict[str, Any] | str) -> None:
        line = f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
        self.wfile.write(f"{len(line):x}\r\n".encode() + line + b"\r\n")
        self.wfile.flush()

    def _drop(self) -> None:
        """The connection ends with the chunked body unfinished, as when the process dies."""
        self.close_connection = True
        self.connection.shutdown(socket.SHUT_RDWR)

    def _json(self, status: int, value: dict[str, Any]) -> None:
        self._send(status, "application/json", json.dumps(value).encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _FakeHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake
        super().__init__(("127.0.0.1", fake.port), _FakeHandler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a front that hung up on a held answer: expected here, not worth a traceback


@contextmanager
def fake_upstream(port: int | None = None, key: str | None = None) -> Iterator[FakeUpstream]:
    """The fake on ``port`` (a free one when None), until the block ends."""
    fake = FakeUpstream(port or free_port(), key)
    server = _FakeHTTPServer(fake)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        fake.release()  # held answers end, so shutdown does not wait on them
        server.shutdown()
        server.server_close()


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
            "model": FAKE_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def _usage(text: str) -> dict[str, int]:
    words = len(text.split(" "))
    return {"prompt_tokens": 9, "completion_tokens": words, "total_tokens": 9 + words}


def _completion(request: dict[str, Any], text: str) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": 0,
            "model": FAKE_MODEL, "usage": _usage(text),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}]}


"""Real upstreams for the remote-engine tests (issue 16), each on a free loopback port, each a
context manager that stops it (the fake that misbehaves on cue is ``tests/fake_upstream.py``).

- ``tanglebox_upstream``: a second Tanglebox (the real gunicorn server) on the embedded model,
  tokens required, so the front's ``apiKeyEnv`` travels for real.
- ``llama_cpp_upstream``: llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``)
  on the same GGUF file; ready when ``/v1/models`` answers (it has no ``/health``).
- ``front_server``: a Tanglebox with no local model (``modelName: ""``) whose
  ``remoteEndpoints`` are the models it serves; ``env`` holds the keys its endpoints name.

Readiness is polled with a deadline; nothing sleeps a fixed time.
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import openai
import pytest
import requests

from bench.servers import free_port, stop_process_group
from tanglebox.model_location import embedded_model_path
from tests.live_server import ROOT, LiveServer, wait_until

UPSTREAM_MODEL = "SmolLM2-135M-Instruct"  # the id a Tanglebox on the embedded model serves
UPSTREAM_TOKEN = "tbx_upstream-key-5f1e2d3c4b5a6978"  # the upstream Tanglebox's API token
LLAMA_CPP_ALIAS = "smollm2-llama-cpp"  # the model id llama_cpp.server answers to
READY_TIMEOUT = 180.0  # seconds a real engine may take to load and answer


def endpoint(name: str, base_url: str, **fields: Any) -> dict[str, Any]:
    """One ``remoteEndpoints`` entry; ``base_url`` goes up to ``/v1``."""
    return {"name": name, "baseUrl": base_url, **fields}


def sdk(url: str, key: str = "unused", timeout: float = 120) -> openai.OpenAI:
    """The official OpenAI client for the server at ``url`` (its ``/v1``), strict, no retries."""
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=timeout,
                         _strict_response_validation=True)


def model_health(server: LiveServer, model_id: str) -> dict:
    """The entry of ``model_id`` in the server's ``/health``."""
    return next(m for m in server.health()["models"] if m["id"] == model_id)


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

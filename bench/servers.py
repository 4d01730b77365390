"""Start the servers the benchmark drives: Tanglebox (``python app.py``) and llama.cpp's server.

Both listen on a free loopback port, log to a file in the benchmark's scratch folder, and are
ready when ``/health`` answers 200 (polled with a deadline). ``stop`` sends SIGTERM and waits.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, command: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self._log,
                                        stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; "
                                   f"see {self.log_path}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)  # polling interval while the model loads
        self.stop()
        raise TimeoutError(f"{self.name} was not ready in {READY_TIMEOUT:g} s; "
                           f"see {self.log_path}")

    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop_process_group(self.process)
        self._log.close()


def stop_process_group(process: subprocess.Popen, grace_seconds: float = 30) -> None:
    """SIGTERM a server started in its own session (and its workers), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def start_tanglebox(model: Path, slots: int, context_length: int, folder: Path,
                    max_tokens: int) -> ServerProcess:
    port = free_port()
    settings = {"port": port, "modelName": str(model), "parallelSlots": slots,
                "contextLength": context_length, "queueSize": 4 * slots,
                "maxNewTokensLimit": max(max_tokens, 4096)}
    path = folder / "tanglebox-settings.json"
    path.write_text(json.dumps(settings), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGLEBOX_")}
    return ServerProcess("tanglebox", [sys.executable, str(ROOT / "app.py"), "--settings",
                                       str(path)], port, folder / "tanglebox.log", env)


def start_llama_server(binary: Path, model: Path, slots: int, context_length: int,
                       threads: int, folder: Path) -> ServerProcess:
    """llama.cpp's own server with the same model, ``-np`` slots and threads as Tanglebox."""
    port = free_port()
    command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(slots), "-c", str(context_length * slots), "-t", str(threads),
               "-tb", str(threads), "--no-webui"]
    return ServerProcess("llama-server", command, port, folder / f"llama-server-np{slots}.log")

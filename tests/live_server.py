"""Start a real Tanglebox server (gunicorn + gevent worker) on a free loopback port.

``LiveServer.start(fake=None, **settings)`` serves the real model (per settings) when ``fake``
is None, else the fake backend built with ``FakeBackend(**fake)``. It waits (polling, with a
deadline) until ``/health`` says ok, and ``stop()`` ends the process.

``wait_until(condition)`` polls a condition with a deadline (tests never sleep a fixed time);
``server.health()`` and ``wait_until_idle(server)`` watch the engine through ``/health``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import requests

from bench.servers import free_port, stop_process_group

ROOT = Path(__file__).resolve().parents[1]


class LiveServer:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.log_path = folder / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, fake: dict | None = None, ready_timeout: float = 180.0,
              **settings) -> "LiveServer":
        self.port = free_port()
        settings = {"port": self.port, **settings}
        settings_path = self.folder / "settings.json"
        settings_path.write_text(json.dumps(settings), encoding="utf-8")
        if fake is None:
            command = [sys.executable, str(ROOT / "app.py"), "--settings", str(settings_path)]
        else:
            command = [sys.executable, "-m", "tests.fake_server", str(settings_path),
                       json.dumps(fake)]
        env = {k: v for k, v in os.environ.items() if not k.startswith("TANGLEBOX_")}
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(ready_timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)  # polling interval while waiting for readiness, not a fixed wait
        raise TimeoutError(f"server not ready in {timeout} s:\n{self.log()}")

    def health(self) -> dict:
        return requests.get(self.url + "/health", timeout=15).json()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        stop_process_group(self.process)
        self._log.close()


def wait_until(condition, timeout: float = 30.0, what: str = "condition"):
    """Poll ``condition`` until it returns something true (returned); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"{what}: not met within {timeout} s"
        time.sleep(0.02)  # polling interval, not a fixed wait
    return result


def wait_until_idle(server: LiveServer, timeout: float = 30.0) -> dict:
    """Poll /health until no slot is busy and nothing waits: cancelled work has left the engine."""
    return wait_until(lambda: (h := server.health())["busy"] == 0 and h["waiting"] == 0 and h,
                      timeout, "every slot free and nothing waiting")

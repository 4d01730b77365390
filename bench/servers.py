"""Start the servers the benchmarks drive: Tanglebox (``python app.py``), with its own model or
as a front to a remote endpoint, and llama.cpp's server.

Both listen on a free loopback port, log to a file in the benchmark's scratch folder, and are
ready when ``/health`` answers 200 (polled with a deadline). ``stop`` sends SIGTERM and waits.

llama-server must run the same kernels as Tanglebox: built from the llama.cpp that
llama-cpp-python vendors, with the same portable flags (docs/benchmarks.md), or started with
``same_libs``: ``LD_LIBRARY_PATH`` at llama-cpp-python's ``llama_cpp/lib``, so it loads the very
libllama/libggml files Tanglebox calls. ``llama_server_libraries`` reads which files it mapped.
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
from typing import Sequence

import requests

ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT = 180.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, name: str, command: list[str], port: int, log_path: Path,
                 env: dict[str, str] | None = None, cwd: Path = ROOT) -> None:
        self.name = name
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.ws_url = f"ws://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(command, cwd=cwd, stdout=self._log,
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
    return start_tanglebox_with({"modelName": str(model), "parallelSlots": slots,
                                 "contextLength": context_length, "queueSize": 4 * slots,
                                 "maxNewTokensLimit": max(max_tokens, 4096)},
                                folder, "tanglebox")


def start_front_tanglebox(upstream_base_url: str, upstream_model: str, slots: int,
                          timeout_seconds: int, folder: Path,
                          max_tokens: int) -> ServerProcess:
    """A Tanglebox with no local model whose one model is a remote OpenAI-compatible endpoint
    (``remoteEndpoints``, issue 16): every reply it serves is proxied to ``upstream_base_url``
    (``…/v1``), ``slots`` at once."""
    endpoint = {"name": "upstream", "baseUrl": upstream_base_url, "model": upstream_model,
                "maxConcurrent": slots, "timeoutSeconds": timeout_seconds}
    return start_tanglebox_with({"modelName": "", "remoteEndpoints": [endpoint],
                                 "queueSize": 4 * slots,
                                 "maxNewTokensLimit": max(max_tokens, 4096)},
                                folder, "tanglebox-front")


def start_tanglebox_with(settings: dict, folder: Path, name: str, checkout: Path = ROOT,
                         fake: dict | None = None) -> ServerProcess:
    """``python app.py`` of ``checkout`` on a free port with these settings, none from the
    environment; with ``fake`` (``FakeBackend``'s arguments), ``tests.fake_server`` instead."""
    port = free_port()
    path = folder / f"{name}-settings.json"
    path.write_text(json.dumps({"port": port, **settings}), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGLEBOX_")}
    command = ([sys.executable, str(checkout / "app.py"), "--settings", str(path)] if fake is None
               else [sys.executable, "-m", "tests.fake_server", str(path), json.dumps(fake)])
    return ServerProcess(name, command, port, folder / f"{name}.log", env, cwd=checkout)


def start_llama_server(binary: Path, model: Path, slots: int, context_length: int,
                       threads: int, folder: Path, same_libs: bool = False,
                       extra_args: Sequence[str] = (),
                       name: str = "llama-server") -> ServerProcess:
    """llama.cpp's own server with the same model, ``-np`` slots and threads as Tanglebox;
    with ``same_libs``, on llama-cpp-python's libllama/libggml instead of its own;
    ``extra_args`` appended (e.g. ``--spec-type``), its log named after ``name``."""
    port = free_port()
    command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
               "-np", str(slots), "-c", str(context_length * slots), "-t", str(threads),
               "-tb", str(threads), "--no-webui", *extra_args]
    env = None
    if same_libs:
        # LD_LIBRARY_PATH comes before the RUNPATH a CMake build writes into the binary
        env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
            [str(llama_cpp_lib_dir())] + [p for p in os.environ.get("LD_LIBRARY_PATH", "")
                                          .split(os.pathsep) if p])}
    return ServerProcess(name, command, port, folder / f"{name}-np{slots}.log", env)


def llama_cpp_lib_dir() -> Path:
    """The folder of the libllama/libggml files llama-cpp-python loads (so Tanglebox calls)."""
    import llama_cpp
    return Path(llama_cpp.__file__).resolve().parent / "lib"


def mapped_llama_libraries(pid: int) -> set[Path]:
    """The libllama and libggml files a running process has mapped (``/proc/PID/maps``)."""
    found = set()
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and Path(fields[5].strip()).name.startswith(
                        ("libllama.", "libggml")):
                    found.add(Path(fields[5].strip()).resolve())
    except OSError:
        pass
    return found


def llama_server_libraries(server: ServerProcess) -> str:
    """One line for the report: whether llama-server runs llama-cpp-python's very libraries."""
    mapped = mapped_llama_libraries(server.pid())
    ours = llama_cpp_lib_dir().resolve()
    if not mapped:
        return ("llama-server maps no libllama/libggml file (linked statically): its kernels are "
                "those of its own build")
    if all(path.parent == ours for path in mapped):
        return f"llama-server runs llama-cpp-python's own libllama/libggml ({ours})"
    folders = ", ".join(sorted({str(path.parent) for path in mapped}))
    return (f"llama-server runs libllama/libggml from {folders}, not llama-cpp-python's: the same "
            "kernels only if built with the same flags (docs/benchmarks.md), else use --same-libs")

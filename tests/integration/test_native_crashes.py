"""Native crashes: caught before the server starts, and a worker that keeps crashing stops the
server with one clear line instead of being restarted forever.

The first-decode crash is a real SIGSEGV inside the self-check's child process: a
``sitecustomize`` on PYTHONPATH replaces llama-cpp-python's ``llama_decode`` with a read of
address 0 and makes ``llama_print_system_info`` report an AMX build, as a ``-march=native``
wheel does on the Xeons where llama.cpp's AMX path crashes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import requests

from tests.live_server import ROOT, LiveServer, free_port, wait_until

SITECUSTOMIZE = '''
import ctypes
import llama_cpp

def _crash(*args):
    ctypes.string_at(0)

_info = llama_cpp.llama_print_system_info
llama_cpp.llama_decode = _crash
llama_cpp.llama_print_system_info = lambda: _info() + b" AMX_INT8 = 1 |"
'''


@pytest.mark.real_model
def test_a_crash_in_the_first_decode_is_one_line_and_exit_status_2(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    server = LiveServer(tmp_path)
    server.port = free_port()
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"port": server.port}), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANGLEBOX_")}
    env["PYTHONPATH"] = str(tmp_path)
    server.process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--settings", str(settings)], cwd=ROOT, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_until(lambda: _served_or_ended(server), 300, "the server to end or to serve")
        assert server.process.poll() is not None, "the server started on a crashing build"
        stderr = server.process.stderr.read()
    finally:
        if server.process.poll() is None:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait()
    assert server.process.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert lines[-1].startswith("tanglebox: error: llama.cpp crashed in its first decode "
                                "(SIGSEGV, signal 11): it was built for this CPU with "
                                "-march=native"), stderr
    assert "python -m pip cache remove llama_cpp_python" in lines[-1]
    assert "Traceback" not in stderr and "tanglebox: serving " not in stderr


@pytest.mark.real_model
def test_the_real_model_passes_the_self_check_before_the_server_starts(tmp_path):
    server = LiveServer(tmp_path).start()
    try:
        log = server.log()
        assert "tanglebox: self-check: SmolLM2-135M-Instruct.Q4_1.gguf generated" in log
        assert log.index("self-check:") < log.index("tanglebox: serving ")
    finally:
        server.stop()


def _served_or_ended(server: LiveServer) -> bool:
    if server.process.poll() is not None:
        return True
    try:
        return requests.get(server.url + "/health", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def test_a_worker_that_keeps_crashing_stops_the_server_with_one_clear_line(fake_server):
    fake_server.start(fake={"crash_on_decode": True})
    crashes = 0
    while fake_server.process.poll() is None:
        assert crashes < 3, f"still running after {crashes} crashes:\n{fake_server.log()}"
        with pytest.raises(requests.RequestException):
            # The worker dies mid-request: the connection ends without a response.
            requests.post(fake_server.url + "/conversation", json={"userPrompt": "hi"},
                          timeout=30)
        crashes += 1
        wait_until(lambda: _served_or_ended(fake_server), 60, "a new worker, or the end")
    assert fake_server.process.wait(timeout=30) == 2
    log = fake_server.log()
    assert log.count("restarting it (") == 2, log
    assert ("tanglebox: error: the serving worker crashed 3 times in 5 minutes (last: "
            "Segmentation fault in ") in log
    assert "stopping instead of restarting it again" in log


def _workers(server: LiveServer) -> set[str]:
    pid = server.process.pid
    with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as children:
        return set(children.read().split())


def test_workers_that_exit_in_order_are_not_counted_as_crashes(fake_server):
    fake_server.start(fake={})
    for reload in range(3):
        old = _workers(fake_server)
        fake_server.process.send_signal(signal.SIGHUP)  # gunicorn: replace the workers
        wait_until(lambda: (now := _workers(fake_server)) and not now & old, 60,
                   "only new workers after SIGHUP")
        wait_until(lambda: _served_or_ended(fake_server), 60, "the new worker serving")
    assert fake_server.process.poll() is None, fake_server.log()
    assert requests.post(fake_server.url + "/conversation", json={"userPrompt": "hi"},
                         timeout=30).text == "You said: hi"
    assert "crashed" not in fake_server.log()

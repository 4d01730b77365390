"""``bench.web_cpu`` reads the web side's CPU as the main thread's of the server and its
children (gevent runs the web side there; the engine and llama.cpp use other threads)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bench.machine import main_thread_cpu_seconds

# Spins 0.4 s of CPU on the main thread or on another one, says so, then waits for stdin.
BUSY = """
import sys, threading, time
def spin():
    until = time.thread_time() + 0.4
    while time.thread_time() < until:
        pass
if sys.argv[1] == "main":
    spin()
else:
    worker = threading.Thread(target=spin)
    worker.start()
    worker.join()
print("spun", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("where, counted", [("main", True), ("other", False)])
def test_the_main_threads_cpu_is_counted_and_other_threads_are_not(where, counted):
    # The child of a shell, as app.py's worker is the child of gunicorn's master.
    shell = subprocess.Popen(["bash", "-c", f'{sys.executable} -c "$0" {where}', BUSY],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert shell.stdout.readline() == "spun\n"
        seconds = main_thread_cpu_seconds(shell.pid)
    finally:
        shell.communicate("\n", timeout=30)
    if counted:
        assert seconds >= 0.35
    else:
        assert seconds < 0.3  # the interpreter's start only

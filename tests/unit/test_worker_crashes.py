"""The crash guard's description of a faulthandler dump (the guard itself runs for real in
tests/integration/test_native_crashes.py)."""

from __future__ import annotations

import os
import sys

import pytest
from gunicorn.errors import HaltServer

from tanglebox.worker_crashes import WorkerCrashes, describe_dump

DUMP = '''Fatal Python error: Segmentation fault

Thread 0x00007f0000000001 (most recent call first):
  File "/srv/venv/lib/python3.11/site-packages/gevent/hub.py", line 647 in run

Current thread 0x00007f0000000002 (most recent call first):
  File "/srv/tanglebox/tanglebox/backends/llama_cpp_backend.py", line 170 in decode
  File "/srv/tanglebox/tanglebox/engine.py", line 410 in _step

Extension modules: numpy.core._multiarray_umath (total: 1)
'''


def test_the_crash_is_named_by_the_fatal_error_and_the_current_threads_innermost_frame():
    assert describe_dump(DUMP) == "Segmentation fault in decode (llama_cpp_backend.py, line 170)"


def test_a_dump_without_frames_still_names_the_fatal_error():
    assert describe_dump("Fatal Python error: Aborted\n\n") == "Aborted"


class _Server:
    LISTENERS = ["a listening socket"]


class _Worker:
    def __init__(self, pid: int) -> None:
        self.pid = pid


def _end_worker(crashes: WorkerCrashes, code: int, cause: Exception | None = None) -> None:
    """What gunicorn's spawn_worker does in the worker: sys.exit(code) after the worker's life
    (or after an exception in it), and the worker_exit hook in ``finally``."""
    def spawn_worker() -> None:
        try:
            if cause is not None:
                raise cause
            sys.exit(code)
        except SystemExit:
            raise
        except Exception:
            sys.exit(code)
        finally:
            crashes.worker_exit(_Server(), _Worker(os.getpid()))

    with pytest.raises(SystemExit):
        spawn_worker()


def test_an_orderly_exit_is_not_a_crash(capsys):
    crashes = WorkerCrashes(limit=1)
    _end_worker(crashes, 0)
    crashes.child_exit(_Server(), _Worker(os.getpid()))  # would halt at the first crash
    assert capsys.readouterr().err == ""


def test_a_booted_worker_ending_with_an_exception_is_a_crash_named_by_it(capsys):
    crashes = WorkerCrashes(limit=2)
    _end_worker(crashes, -1, ValueError("the listening socket broke"))
    crashes.child_exit(_Server(), _Worker(os.getpid()))
    assert ("the serving worker crashed (ValueError: the listening socket broke); restarting "
            "it (1 of 2 crashes allowed in 5 minutes)") in capsys.readouterr().err
    _end_worker(crashes, -1, ValueError("again"))
    with pytest.raises(HaltServer) as halted:
        crashes.child_exit(_Server(), _Worker(os.getpid()))
    assert halted.value.exit_status == 2
    assert "crashed 2 times in 5 minutes (last: ValueError: again)" in halted.value.reason

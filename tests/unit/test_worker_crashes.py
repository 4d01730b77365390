"""The crash guard's description of a faulthandler dump (the guard itself runs for real in
tests/integration/test_native_crashes.py)."""

from __future__ import annotations

from tanglebox.worker_crashes import describe_dump

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

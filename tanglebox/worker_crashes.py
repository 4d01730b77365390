"""Stop a worker that keeps crashing, instead of letting gunicorn restart it forever in silence.

gunicorn's master restarts a worker that dies, whatever killed it. For a native crash in the
model (a segfault in llama.cpp, an abort in CUDA) the next worker usually crashes the same way,
and the server flips between "loading" and a dead connection for as long as it runs. So:

- each worker, once forked, points ``faulthandler`` at a file the master made: a native crash
  writes "Fatal Python error: Segmentation fault" and every thread's stack there;
- a worker that exits in order (SIGTERM, a reload: ``sys.exit(0)``) writes its pid to a second
  file from its ``worker_exit`` hook, which a native crash never reaches; a worker that ends
  with an exception writes the exception where faulthandler writes;
- the master's ``child_exit`` hook counts the other exits: each is one line on stderr naming
  the crash (from the faulthandler dump, or "killed" when there is none, as for the kernel's
  out-of-memory kill); at ``CRASH_LIMIT`` crashes within ``CRASH_WINDOW_SECONDS`` it halts the
  server with exit status 2 and one line saying why.

Clients whose replies were running in the crashed process lose their connection: a streamed
reply ends without its final chunk or websocket close frame, which clients report as cut.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import re
import sys
import tempfile
import time

from gunicorn.errors import HaltServer

CRASH_LIMIT = 3
CRASH_WINDOW_SECONDS = 300.0
CRASH_EXIT_STATUS = 2
_FRAME = re.compile(r'File "(?P<path>[^"]+)", line (?P<line>\d+) in (?P<function>\S+)')


class WorkerCrashes:
    """The three gunicorn hooks that notice crashed workers; made in the master, before forks."""

    def __init__(self, limit: int = CRASH_LIMIT,
                 window_seconds: float = CRASH_WINDOW_SECONDS) -> None:
        self.limit = limit
        self.window_seconds = window_seconds
        self._dumps = tempfile.TemporaryFile()  # faulthandler output of every worker
        self._orderly = tempfile.TemporaryFile()  # pids of workers that exited in order
        self._dumps_read = 0
        self._crash_times: collections.deque[float] = collections.deque()

    # -- in the worker -------------------------------------------------------------------

    def post_fork(self, server, worker) -> None:
        faulthandler.enable(file=self._dumps, all_threads=True)

    def worker_exit(self, server, worker) -> None:
        # gunicorn calls this in a ``finally`` around the worker's life, while its
        # ``sys.exit(code)`` propagates: code 0 is an orderly exit, anything else (-1 after an
        # exception in a booted worker) is a crash, told as faulthandler would tell it.
        ending = sys.exc_info()[1]
        if isinstance(ending, SystemExit) and ending.code in (0, None):
            os.write(self._orderly.fileno(), f"{os.getpid()}\n".encode())
            return
        cause = getattr(ending, "__context__", None) or ending
        what = f"{type(cause).__name__}: {cause}" if cause is not None else "exit without cause"
        os.write(self._dumps.fileno(), f"Fatal Python error: {what}\n".encode(errors="replace"))

    # -- in the master -------------------------------------------------------------------

    def child_exit(self, server, worker) -> None:
        if not server.LISTENERS:
            return  # the master is stopping: it ended its workers itself
        if str(worker.pid).encode() in _read(self._orderly, 0).split():
            return
        what = self._describe_new_crash()
        now = time.monotonic()
        self._crash_times.append(now)
        while now - self._crash_times[0] > self.window_seconds:
            self._crash_times.popleft()
        minutes = f"{self.window_seconds / 60:g} minutes"
        if len(self._crash_times) >= self.limit:
            line = (f"the serving worker crashed {len(self._crash_times)} times in {minutes} "
                    f"(last: {what}); stopping instead of restarting it again "
                    "(README: Troubleshooting)")
            print(f"tanglebox: error: {line}", file=sys.stderr, flush=True)
            raise HaltServer(line, CRASH_EXIT_STATUS)
        print(f"tanglebox: error: the serving worker crashed ({what}); restarting it "
              f"({len(self._crash_times)} of {self.limit} crashes allowed in {minutes})",
              file=sys.stderr, flush=True)

    def _describe_new_crash(self) -> str:
        data = _read(self._dumps, self._dumps_read)
        self._dumps_read += len(data)
        dump = data.decode(errors="replace")
        if not dump.strip():
            return "killed without a trace: out of memory, or stopped answering"
        sys.stderr.write(dump)
        return describe_dump(dump)


def _read(file, offset: int) -> bytes:
    """From ``offset`` to the end, without moving the offset the workers write at."""
    size = os.fstat(file.fileno()).st_size
    return os.pread(file.fileno(), max(0, size - offset), offset)


def describe_dump(dump: str) -> str:
    """'Segmentation fault in decode (llama_cpp_backend.py, line 170)' from a faulthandler dump."""
    fatal = re.search(r"Fatal Python error: (.+)", dump)
    what = fatal.group(1).strip() if fatal else "a fatal error"
    current = dump.split("Current thread", 1)
    frame = _FRAME.search(current[1] if len(current) > 1 else dump)
    if frame:
        what += (f" in {frame['function']} ({os.path.basename(frame['path'])}, "
                 f"line {frame['line']})")
    return what

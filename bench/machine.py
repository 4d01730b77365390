"""What the benchmarks say about the machine they ran on: its CPU, its load, and how much CPU
time other processes took while a benchmark ran.

The benchmarks share their machine with other jobs, so every report carries these lines: the
CPU model (from ``/proc/cpuinfo``), the load average before and after, and the fraction of all
CPU time that processes other than the benchmark's own used during the measured rounds.
"""

from __future__ import annotations

import os
import time


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's ``model name`` line from ``/proc/cpuinfo`` (or the text given), "" if none."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as source:
                cpuinfo = source.read()
        except OSError:
            return ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return ""


def load_average() -> tuple[float, float, float]:
    """The 1-, 5- and 15-minute load averages (runnable processes, not a percentage)."""
    return os.getloadavg()


class OtherLoad:
    """CPU time the rest of the machine used while the benchmark ran, as a fraction of all CPU
    time: the benchmark shares its machine, and this says how much the numbers were disturbed."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.start = (time.monotonic(), _machine_busy_ticks(), self._own_ticks())

    def fraction(self) -> float:
        started, busy, own = self.start
        elapsed_ticks = (time.monotonic() - started) * os.sysconf("SC_CLK_TCK") * (
            os.cpu_count() or 1)
        other = (_machine_busy_ticks() - busy) - (self._own_ticks() - own)
        return max(0.0, other / elapsed_ticks) if elapsed_ticks else 0.0

    def _own_ticks(self) -> int:
        return sum(_process_ticks(pid) for pid in _with_descendants(self.pids))


def _machine_busy_ticks() -> int:
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def _process_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return sum(int(v) for v in fields[11:15])  # utime, stime, and of waited-for children


def _with_descendants(pids: list[int]) -> set[int]:
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as children:
                    todo += [int(c) for c in children.read().split()]
        except OSError:
            pass
    return found


def main_thread_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) the main threads of ``pid`` and its descendants have used:
    a Tanglebox worker's web side (gevent runs every request and socket on the main thread;
    the engine and llama.cpp's threads are others)."""
    total = 0
    for process in _with_descendants([pid]):
        try:
            with open(f"/proc/{process}/task/{process}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")

"""Under gevent, waiting for the engine never blocks the hub; without gevent, plain threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tanglebox.handoff import EventChannel, Wakeup, start_native_thread
from tests.conftest import ROOT

GEVENT_SCRIPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from tanglebox.chat_request import ChatRequest
    from tanglebox.engine import Delta, Engine
    from tanglebox.prompting import USER, Message
    from tests.fake_backend import FakeBackend

    engine = Engine(FakeBackend(step_delay=0.005), "auto")
    engine.start()
    ticks = []
    def ticker():
        while True:
            ticks.append(1)
            gevent.sleep(0.001)
    def consume(text):
        generation = engine.submit(ChatRequest((Message(USER, "echo " + text),), "", 0.0, 200))
        return "".join(e.text for e in generation.events() if isinstance(e, Delta))
    tick = gevent.spawn(ticker)
    replies = gevent.joinall([gevent.spawn(consume, f"reply {i} " * 5) for i in range(3)])
    tick.kill()
    engine.stop(drain_seconds=1)
    print([g.value for g in replies] == [f"reply {i} " * 5 for i in range(3)], len(ticks))
""")


def test_greenlets_keep_running_while_they_wait_for_the_engine():
    result = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    replies_ok, ticks = result.stdout.split()
    assert replies_ok == "True"
    # ~90 decode steps of 5 ms each: a hub blocked on the engine would not tick at all.
    assert int(ticks) > 20


# The engine holds wake-ups back while a step hands out its tokens (put(..., wake=False), then
# wake()), so the hub may run the callback of an earlier wake-up between the final item and
# its wake-up. The producer yields the GIL there, as numpy and ctypes calls do in the engine.
HELD_WAKE_SCRIPT = textwrap.dedent("""
    import sys
    from gevent import monkey
    monkey.patch_all()
    import gevent, time
    from tanglebox.handoff import EventChannel, native_lock, start_native_thread

    channels = [EventChannel() for _ in range(300)]
    failures = []
    done = native_lock()
    done.acquire()
    def produce():
        try:
            for channel in channels:
                channel.put("delta")
                time.sleep(0.0002)  # the hub may run the delta's callback from here on
                channel.put("done", final=True, wake=False)
                time.sleep(0.0002)
                channel.wake()
                channel.wake()  # a second wake-up after the final one changes nothing
        except Exception as err:
            failures.append(repr(err))
        finally:
            done.release()
    def consume(channel):
        return [channel.get(timeout=10), channel.get(timeout=10)]
    readers = [gevent.spawn(consume, c) for c in channels]
    start_native_thread(produce)
    gevent.joinall(readers, timeout=60)
    while not done.acquire(False):
        gevent.sleep(0.01)
    gevent.sleep(0.05)  # callbacks of the last wake-ups
    print(failures == [], all(r.value == ["delta", "done"] for r in readers),
          all(c._closed for c in channels))
""")


@pytest.mark.parametrize("loop", ["libev-cext", "libev-cffi", "libuv-cffi"])
def test_held_back_wake_ups_never_touch_a_closed_watcher_and_every_watcher_closes(loop):
    result = subprocess.run([sys.executable, "-c", HELD_WAKE_SCRIPT], cwd=ROOT,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "GEVENT_LOOP": loop})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "True"], result.stderr


def test_channel_between_a_native_thread_and_a_thread():
    channel = EventChannel()
    start_native_thread(lambda: [channel.put(i, final=i == 99) for i in range(100)])
    assert [channel.get(timeout=10) for _ in range(100)] == list(range(100))
    assert channel.get(timeout=0.01) is None


def test_wakeup_signals_once():
    wakeup = Wakeup()
    assert not wakeup.wait(0.01)
    wakeup.set()
    wakeup.set()  # a second signal before the wait collapses into the first
    assert wakeup.wait(1)
    assert not wakeup.wait(0.01)

"""How the engine's OS thread and the web's greenlets talk without blocking each other.

Under gevent (our server), ``threading`` is monkey-patched: a "thread" is a greenlet, and a
blocking C call in one (a llama.cpp decode) freezes every client. So:

- the engine runs on a real OS thread, started with the *original* ``_thread`` functions;
- the engine sleeps on a :class:`Wakeup` built on an original (unpatched) lock, and says it
  has stopped with a :class:`Latch`;
- events go back to a greenlet through an :class:`EventChannel`: a deque plus a libev async
  watcher, whose ``send()`` is the one thread-safe way to wake a gevent hub. The greenlet waits
  on a gevent Event that the watcher's callback sets, so other greenlets keep running.

Without gevent (unit tests, the Flask test client) the same classes fall back to plain
``threading`` primitives.
"""

from __future__ import annotations

import collections
import importlib
import sys
import threading
from typing import Any, Callable


def _original(module: str, name: str) -> Any:
    if "gevent.monkey" in sys.modules:
        from gevent import monkey
        return monkey.get_original(module, name)
    return getattr(importlib.import_module(module), name)


def gevent_active() -> bool:
    if "gevent.monkey" not in sys.modules:
        return False
    from gevent import monkey
    return monkey.is_module_patched("threading")


def start_native_thread(target: Callable[[], None]) -> int:
    """Run ``target`` on a real OS thread, even when threading is monkey-patched."""
    return _original("_thread", "start_new_thread")(target, ())


def native_lock() -> Any:
    return _original("_thread", "allocate_lock")()


class Wakeup:
    """A signal the engine thread sleeps on; any thread or greenlet may set it."""

    def __init__(self) -> None:
        self._lock = native_lock()
        self._lock.acquire()  # held means "no signal pending"

    def set(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:
            pass  # a signal is already pending

    def wait(self, timeout: float) -> bool:
        return self._lock.acquire(True, timeout)


class Latch:
    """Set once, by any thread, and set for good: every ``wait`` after that returns at once.

    (A :class:`Wakeup` is taken by the one ``wait`` it wakes; the engine's "stopped" must be
    seen by every caller of ``Engine.stop``, a second one included.)
    """

    def __init__(self) -> None:
        self._wakeup = Wakeup()
        self._set = False

    def set(self) -> None:
        self._set = True
        self._wakeup.set()

    def wait(self, timeout: float) -> bool:
        if self._set:
            return True
        if self._wakeup.wait(timeout):
            self._wakeup.set()  # pass it on to the next waiter
            return True
        return self._set


class EventChannel:
    """One producer (the engine thread) puts; one consumer (a greenlet or thread) gets.

    The producer marks its last item ``final``. Under gevent, the watcher closes itself from its
    own callback, in the hub's thread, once the wake-up sent after the final item has come, so
    a consumer that went away never leaks it. The producer may hold wake-ups back (``put(...,
    wake=False)``, then ``wake()``), and a callback of an earlier wake-up may run meanwhile: a
    lock makes "send a wake-up" and "close the watcher" exclude each other, so the producer
    never sends on a closed watcher and the watcher closes only after the last wake-up.
    """

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._final_put = False
        if gevent_active():
            import gevent.event
            self._ready = gevent.event.Event()
            self._watcher = gevent.get_hub().loop.async_()
            self._watcher.start(self._on_wake)
            self._watcher_lock = native_lock()
            self._final_sent = False  # the wake-up after the final item has been sent
            self._closed = False
        else:
            self._ready = threading.Event()
            self._watcher = None

    def put(self, item: Any, final: bool = False, wake: bool = True) -> None:
        """Queue ``item``; ``wake=False`` leaves waking the consumer to a later ``wake()``."""
        self._items.append(item)
        if final:
            self._final_put = True
        if wake:
            self.wake()

    def wake(self) -> None:
        if self._watcher is None:
            self._ready.set()
            return
        with self._watcher_lock:
            if not self._closed:  # closed only after a wake-up that followed the final item
                self._final_sent = self._final_put
                self._watcher.send()

    def get(self, timeout: float | None = None) -> Any | None:
        """The next item, or None when ``timeout`` seconds pass without one."""
        while True:
            if self._items:
                return self._items.popleft()
            self._ready.clear()
            if self._items:  # put() between the check and clear()
                continue
            if not self._ready.wait(timeout):
                return None

    def _on_wake(self) -> None:
        self._ready.set()
        with self._watcher_lock:
            if self._final_sent and not self._closed:
                self._closed = True
                self._watcher.stop()
                self._watcher.close()

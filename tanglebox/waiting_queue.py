"""The engine's waiting line: bounded, fair, and the only holder of the engine's lock.

Adapters' greenlets ``submit`` while the engine's thread takes the ``next`` request whenever a
slot is free, so everything the two sides share lives here, behind one native lock:

- **bounded**: at most ``capacity`` requests (slots + ``queueSize``) are in the system, waiting
  or running; past it ``submit`` refuses at once with :class:`QueueFull` (after first dropping
  requests whose clients have gone) instead of leaving a client hanging;
- **fair**: requests wait per client, first come first served within a client and round-robin
  across clients, so one client's burst never holds up another client's first request; and a
  client may have at most ``per_client`` requests waiting (past it: :class:`ClientQueueFull`),
  so one client cannot take every place in the queue;
- **closing**: after ``close`` nothing new is taken, and the engine drains what is in the
  system until the drain deadline.

Requests that leave without running (cancelled while waiting, past ``request_timeout``, or
left at shutdown) are answered here, always after the lock is released.
"""

from __future__ import annotations

import collections
import math
import time

from tanglebox import handoff
from tanglebox.chat_request import ChatRequest
from tanglebox.generation import SHUTTING_DOWN, Error, ErrorCode, FinishReason, Generation


class QueueFull(Exception):
    """Every slot is busy and the queue is full: try again after ``retry_after`` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"every slot is busy and the queue is full; retry in {retry_after} s")
        self.retry_after = retry_after


class ClientQueueFull(QueueFull):
    """This client already has its share of requests waiting."""

    def __init__(self, retry_after: int, per_client: int) -> None:
        super().__init__(retry_after)
        self.per_client = per_client


class EngineStopped(Exception):
    """The engine is shutting down and takes no new work."""


class WaitingQueue:
    """Requests waiting for a slot, and the count of those in the system (see the module)."""

    def __init__(self, slots: int, queue_size: int, request_timeout: float,
                 per_client: int | None = None) -> None:
        self.capacity = slots + queue_size
        self.per_client = per_client
        self.retry_after = 2 + queue_size // max(1, slots)
        self.request_timeout = request_timeout
        self._pending: collections.OrderedDict[str, collections.deque[Generation]] = (
            collections.OrderedDict())
        self._in_system = 0  # waiting + running
        self._closed = False
        self._drain_deadline = math.inf
        self._lock = handoff.native_lock()

    # -- the adapters' side -------------------------------------------------------------

    def submit(self, request: ChatRequest) -> Generation:
        """Queue a request; raises QueueFull or EngineStopped at once instead of waiting."""
        with self._lock:
            if self._closed:
                raise EngineStopped()
            dropped = []
            if self._in_system >= self.capacity:
                # Requests whose clients left (or that timed out) while waiting still hold
                # places until the engine's next step; free those before refusing anyone.
                dropped = self._take_gone()
            full = self._in_system >= self.capacity
            waiting = len(self._pending.get(request.client_id, ()))
            client_full = self.per_client is not None and waiting >= self.per_client
            if not full and not client_full:
                # Made only once admitted: each Generation holds an event watcher until its
                # final event, so a refused request must not create one.
                generation = Generation(request)
                self._in_system += 1
                self._pending.setdefault(request.client_id, collections.deque()).append(
                    generation)
        self._answer_gone(dropped)
        if full:
            raise QueueFull(self.retry_after)
        if client_full:
            raise ClientQueueFull(self.retry_after, self.per_client)
        return generation

    def counts(self) -> tuple[int, int]:
        """Requests in the system (waiting or running), and those waiting."""
        with self._lock:
            return self._in_system, sum(len(q) for q in self._pending.values())

    def close(self, drain_deadline: float) -> float:
        """Take no new requests; returns the drain deadline (an earlier close's, if sooner)."""
        with self._lock:
            self._closed = True
            self._drain_deadline = min(self._drain_deadline, drain_deadline)
            return self._drain_deadline

    # -- the engine thread's side -------------------------------------------------------

    def next(self) -> Generation | None:
        """The request to run next: round-robin over clients, FIFO within a client."""
        cancelled = []
        with self._lock:
            generation = None
            while self._pending and generation is None:
                client, queue = next(iter(self._pending.items()))
                generation = queue.popleft()
                if queue:
                    self._pending.move_to_end(client)
                else:
                    del self._pending[client]
                if generation.cancelled:
                    self._in_system -= 1
                    cancelled.append(generation)
                    generation = None
        for gone in cancelled:
            gone._end_unstarted(FinishReason.CANCELLED)
        return generation

    def drop_gone(self) -> None:
        """Answer waiting requests whose clients have gone, or that waited past the request
        timeout, so they free their places in the queue now."""
        with self._lock:
            dropped = self._take_gone()
        self._answer_gone(dropped)

    def release(self) -> None:
        """A request that was taken with ``next`` has ended: its place is free."""
        with self._lock:
            self._in_system -= 1

    def shut_down(self) -> None:
        """Answer every waiting request with an error: the server is shutting down."""
        with self._lock:
            waiting = [g for q in self._pending.values() for g in q]
            self._pending.clear()
            self._in_system -= len(waiting)
        for generation in waiting:
            generation._emit(Error(ErrorCode.SHUTDOWN, SHUTTING_DOWN))

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def empty(self) -> bool:
        return self._in_system == 0

    def drain_expired(self) -> bool:
        return time.monotonic() >= self._drain_deadline

    def _take_gone(self) -> list[Generation]:
        """Remove cancelled or timed-out requests (under the lock); the caller answers them."""
        expired = time.monotonic() - self.request_timeout
        gone = lambda g: g.cancelled or g.submitted_at < expired  # noqa: E731
        dropped = []
        for client in [c for c, q in self._pending.items() if any(gone(g) for g in q)]:
            queue = self._pending[client]
            dropped += [g for g in queue if gone(g)]
            kept = collections.deque(g for g in queue if not gone(g))
            if kept:
                self._pending[client] = kept
            else:
                del self._pending[client]
        self._in_system -= len(dropped)
        return dropped

    @staticmethod
    def _answer_gone(dropped: list[Generation]) -> None:
        for generation in dropped:
            generation._end_unstarted(FinishReason.CANCELLED if generation.cancelled
                                      else FinishReason.TIMEOUT)

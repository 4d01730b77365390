"""Replies owned by the server: a reply goes on being written when the page that asked for it
goes away, and any page of its conversation can watch it, or stop it.

One reply's life (a :class:`ReplyRun`)::

    socket: ReplyRuns.start(conversation, parent, prompt, generation, metadata)
        -> ReplyRun, reading the Generation in its own greenlet (a thread without gevent)
    each Delta: ``text`` grows, ``version`` + 1, the watchers are woken; the first event stores
        the person's message (when there is one) and the reply (state "writing")
    every SAVE_INTERVAL_SECONDS while runs are writing, ReplyRuns saves the text of each that
        grew, all in one transaction (``ReplySaver.save_writing``: one save a second for the
        whole server, not one per reply)
    the final event: the reply saved with its state, note and metadata (model, sampling, seed,
        token counts, timings, finish reason, the prompt the model read); ``ended`` set; the run leaves ReplyRuns
    watchers (sockets): ``with run.watching(): run.wait_for(version, timeout)``; each renders
        from the whole ``text``, so a page that comes back mid-reply has no gap and no repeat
    stop(): from any socket; the engine ends the reply with Done(cancelled): "stopped"

Nothing is stored before the first event: a request the engine refuses before writing anything
(a prompt too long) leaves no message behind, and its page gives the person their text back.
With ``finishRepliesWithoutWatchers`` false, the last watcher leaving stops the reply
("interrupted"). A server that drains on shutdown ends replies with Done(shutdown): saved
"interrupted" with their text; a hard kill leaves "writing", which the store marks
interrupted at the next start (``ConversationStore.interrupt_unfinished``).

The store's calls are short and run in the run's greenlet, or the saver's (DESIGN.md: one
worker process), so ``ReplyRuns`` needs no lock for its map: none of its methods yields
between reading and writing it (without gevent, a lock keeps one saver thread at a time).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

from tanglebox.generation import (
    ENDED_EARLY,
    Delta,
    Done,
    Error,
    ErrorCode,
    FinishReason,
    Generation,
)
from tanglebox.handoff import gevent_active

log = logging.getLogger(__name__)

SAVE_INTERVAL_SECONDS = 1.0  # a crash loses at most about this much of a reply's text
READ_POLL_SECONDS = 0.1  # how often a reader with no event looks whether it was stopped
STOP_GRACE_SECONDS = 10.0  # a stopped reply the engine never ends is ended by the run
INTERRUPTED = "Interrupted"  # the note of a reply cut off by a restart (as the store writes it)

WRITING, DONE, STOPPED, INTERRUPTED_STATE, FAILED = (
    "writing", "done", "stopped", "interrupted", "failed")


class ReplySaver(Protocol):
    """Where a run stores its messages (``ConversationStore`` is one)."""

    def start_reply(self, conversation_id: str, parent_id: int | None, prompt: str | None,
                    **metadata: Any) -> tuple[int | None, int]: ...

    def save_writing(self, texts: dict[int, str]) -> None: ...

    def update_reply(self, message_id: int, content: str, state: str, note: str = "",
                     **metadata: Any) -> None: ...


@dataclass(frozen=True)
class ReplyEnd:
    """How a reply ended: its stored state and note; ``error`` when it failed before any text
    was written (nothing was stored then)."""

    state: str
    note: str
    error: str = ""


class Busy(Exception):
    """A reply is already being written for this conversation."""


@dataclass(eq=False)
class ReplyRun:
    """One reply being written for one conversation (see the module's docstring)."""

    conversation_id: str
    parent_id: int | None  # the message the new one follows
    prompt: str | None  # the person's new message; None: regenerate (``parent_id`` is theirs)
    generation: Generation
    saver: ReplySaver
    metadata: dict[str, Any]  # stored with the reply: model, template, sampling, seed
    finish_without_watchers: bool = True
    text: str = ""
    version: int = 0  # + 1 at every change a watcher may render
    ended: ReplyEnd | None = None
    prompt_message_id: int | None = None  # stored at the first event
    message_id: int | None = None
    watchers: int = 0
    _stop_reason: str = ""  # STOPPED or INTERRUPTED_STATE once asked to stop
    _stopped_at: float = 0.0
    saved_version: int = 0  # the version whose text ReplyRuns saved last
    _on_end: list = field(default_factory=list)
    # Looked up at creation, not import: under gevent, threading is patched to be greenlets'.
    _changed: threading.Condition = field(default_factory=lambda: threading.Condition())
    _ended_event: threading.Event = field(default_factory=lambda: threading.Event())

    # -- watchers --------------------------------------------------------------------------

    @contextmanager
    def watching(self) -> Iterator["ReplyRun"]:
        """Counts a watcher while inside; the last one leaving stops the reply when replies
        are not finished without watchers."""
        self.watchers += 1
        try:
            yield self
        finally:
            self.watchers -= 1
            if self.watchers == 0 and not self.finish_without_watchers:
                self.stop(INTERRUPTED_STATE)

    def wait_for(self, version: int, timeout: float) -> bool:
        """Wait until the run is past ``version`` or has ended; False after ``timeout``."""
        with self._changed:
            return self._changed.wait_for(
                lambda: self.version > version or self.ended is not None, timeout)

    def wait_for_end(self, timeout: float) -> bool:
        """Wait until the run has ended (not woken by its text growing); False after
        ``timeout``."""
        return self._ended_event.wait(timeout)

    def stop(self, reason: str = STOPPED) -> None:
        """End the reply now (Stop, from any socket); what was written is kept."""
        if self.ended is None and not self._stop_reason:
            self._stop_reason, self._stopped_at = reason, time.monotonic()
            self.generation.cancel()

    # -- the reader ------------------------------------------------------------------------

    def start(self) -> None:
        _in_background(self._read, "reply-run")

    def _read(self) -> None:
        outcome: Done | Error | None = None
        try:
            while outcome is None:
                event = self.generation.next_event(READ_POLL_SECONDS)
                if event is None and self._stop_reason and (
                        time.monotonic() - self._stopped_at > STOP_GRACE_SECONDS):
                    break
                outcome = self._take(event)
        except Exception:  # noqa: BLE001 - a failed save must still end the run for its pages
            log.exception("a reply run failed")
            outcome = Error(ErrorCode.INTERNAL, "The reply could not be saved.")
        self._finish(outcome)

    def _take(self, event: Delta | Done | Error | None) -> Done | Error | None:
        """One event read: the text grows (saved now and then, watchers woken), or the
        final event, returned."""
        if isinstance(event, Delta):
            self._store_once()
            self.text += event.text
            self._wake()
            return None
        return event

    def _store_once(self) -> None:
        if self.message_id is not None:
            return
        self.prompt_message_id, self.message_id = self.saver.start_reply(
            self.conversation_id, self.parent_id, self.prompt, **self.metadata)
        self.saved_version = self.version  # the reply stored empty, at version 0

    def _finish(self, outcome: Done | Error | None) -> None:
        end = self._ending(outcome)
        try:
            if end.error:
                pass  # nothing was written: nothing is stored
            else:
                self._store_once()
                if isinstance(outcome, Done):
                    self.text = outcome.text or self.text
                self.saver.update_reply(self.message_id, self.text, end.state, end.note,
                                        **self._done_metadata(outcome))
        except Exception:  # noqa: BLE001 - the pages still hear how it ended
            log.exception("saving the end of a reply failed")
        finally:
            for callback in self._on_end:  # first: a page told of the end may start the next
                callback(self)
            with self._changed:
                self.ended = end
                self.version += 1
                self._changed.notify_all()
            self._ended_event.set()

    def _ending(self, outcome: Done | Error | None) -> ReplyEnd:
        if isinstance(outcome, Error):
            return (ReplyEnd(FAILED, outcome.message) if self.text or self.message_id
                    else ReplyEnd(FAILED, outcome.message, error=outcome.message))
        reason = outcome.finish_reason if outcome is not None else FinishReason.CANCELLED
        if reason == FinishReason.SHUTDOWN or self._stop_reason == INTERRUPTED_STATE:
            return ReplyEnd(INTERRUPTED_STATE, INTERRUPTED)
        if reason == FinishReason.CANCELLED:
            return ReplyEnd(STOPPED, ENDED_EARLY[reason])
        if reason == FinishReason.LENGTH:
            return ReplyEnd(DONE, f"Stopped at the limit of "
                                  f"{self.generation.request.max_new_tokens} new tokens.")
        if reason in ENDED_EARLY:
            return ReplyEnd(STOPPED, ENDED_EARLY[reason])
        text = outcome.text if outcome is not None else self.text
        return ReplyEnd(DONE, "" if text.strip() else "The model gave an empty reply.")

    def _done_metadata(self, outcome: Done | Error | None) -> dict[str, Any]:
        prompt = {"prompt_text": self.generation.prompt_text}  # set at admission: "Show prompt"
        if not isinstance(outcome, Done):
            return prompt
        return {**prompt, "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": outcome.completion_tokens,
                "cached_tokens": outcome.cached_tokens, "timings": dict(outcome.timings),
                "finish_reason": str(outcome.finish_reason)}

    def _wake(self) -> None:
        with self._changed:
            self.version += 1
            self._changed.notify_all()


class ReplyRuns:
    """The replies being written, by conversation id: at most one per conversation."""

    run_class: type[ReplyRun] = ReplyRun  # (bench/ui_deltas.py steps a run by hand)

    def __init__(self, saver: ReplySaver, finish_without_watchers: bool = True) -> None:
        self.saver = saver
        self.finish_without_watchers = finish_without_watchers
        self._runs: dict[str, ReplyRun] = {}
        self._saving = False  # the saver's greenlet (a thread without gevent) is running
        self._saving_lock = threading.Lock()  # start() and the saver's exit, without gevent

    def get(self, conversation_id: str) -> ReplyRun | None:
        return self._runs.get(conversation_id)

    def busy(self, conversation_id: str) -> bool:
        return conversation_id in self._runs

    def start(self, conversation_id: str, parent_id: int | None, prompt: str | None,
              generation: Generation, metadata: dict[str, Any]) -> ReplyRun:
        """Start reading ``generation`` for this conversation; Busy when one is running (the
        caller checks ``busy`` before submitting, so this only guards a race)."""
        if conversation_id in self._runs:
            generation.cancel()
            raise Busy(conversation_id)
        run = self.run_class(conversation_id, parent_id, prompt, generation, self.saver, metadata,
                       self.finish_without_watchers)
        run._on_end.append(self._forget)
        self._runs[conversation_id] = run
        run.start()
        self._start_saving()
        return run

    def __len__(self) -> int:
        return len(self._runs)

    def _forget(self, run: ReplyRun) -> None:
        if self._runs.get(run.conversation_id) is run:
            del self._runs[run.conversation_id]

    # -- saving the texts as they grow -----------------------------------------------------

    def _start_saving(self) -> None:
        with self._saving_lock:
            if self._saving:
                return
            self._saving = True
        _in_background(self._save_while_writing, "reply-saves")

    def _save_while_writing(self) -> None:
        """Every SAVE_INTERVAL_SECONDS, the texts that grew, in one call; ends with the runs."""
        while True:
            time.sleep(SAVE_INTERVAL_SECONDS)
            with self._saving_lock:
                if not self._runs:
                    self._saving = False
                    return
            self.save_now()

    def save_now(self) -> None:
        """Save the text of every run that grew since it was last saved (and has not ended:
        its end saves it)."""
        grown = [(run, run.version, run.text) for run in list(self._runs.values())
                 if run.message_id is not None and run.ended is None
                 and run.version > run.saved_version]
        if not grown:
            return
        try:
            self.saver.save_writing({run.message_id: text for run, _, text in grown})
        except Exception:  # noqa: BLE001 - the next save tries again; the end is saved apart
            log.exception("saving the replies being written failed")
            return
        for run, version, _ in grown:
            run.saved_version = version


def _in_background(target: Callable[[], None], name: str) -> None:
    """Run ``target`` in a greenlet of this worker (a daemon thread without gevent)."""
    if gevent_active():
        import gevent
        gevent.spawn(target)
    else:
        threading.Thread(target=target, name=name, daemon=True).start()

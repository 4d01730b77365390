"""The chat UI's socket watching a reply being written (``reply_runs``), and how often it
renders it again (:class:`RenderPacer`).

A socket that asked for a reply, or that connected while one was being written, watches it: it
waits for the run's next change (``ReplyRun.wait_for``, or ``RELAY_POLL_SECONDS`` without one),
or, when it rendered a moment ago and more came, for the next render's time
(``ReplyRun.wait_for_end``: tokens do not wake it one by one, only the end does), answers what
its client sent meanwhile (Stop stops the reply for every socket; New chat stops watching;
settings apply from the next reply on; anything else is refused: busy), and renders the reply
from its whole text so far (``ui_fragments.StreamedReply``): a socket that comes in mid-reply
shows it so far, then the rest, with no gap and no repeat. When the run ends, every watcher
shows the end (``_ended``); a socket that closes just stops watching.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from tanglebox.generation import RELAY_POLL_SECONDS
from tanglebox.reply_runs import ReplyRun
from tanglebox.runtime import Runtime
from tanglebox.web.ui_conversation import Conversation, Turn, UiChats
from tanglebox.web.ui_fragments import (
    ReplyFragments,
    error_fragment,
    messages_fragment,
    reply_meta_fragment,
    turn_fragment,
)

RENDER_INTERVAL_SECONDS = 0.08  # about 12 updates a second: smooth to read, cheap to render
RENDER_CPU_SHARE = 0.02  # of one core, for re-rendering every streaming reply of this process

BUSY = "A reply is still being written: wait for it, or press Stop."


class RenderPacer:
    """How often a streaming reply is rendered again, across every UI socket of the process.

    Each update (the open tail's Markdown parsed and rendered again, a finished block rendered
    once, then the send) takes CPU from the model on a CPU server. A reply is updated at most
    every ``RENDER_INTERVAL_SECONDS``, and less often when its update is slow (a long open
    block: a long list or code block) or many replies stream at once, so that updating all of
    them stays near ``RENDER_CPU_SHARE`` of one core. On a CPU server every core is busy with
    the model while replies stream, so this is taken from everyone's tokens: with 8 replies
    of about 500 characters (0.5 ms a render) each updates every ~200 ms instead of every
    80; prose, rendered without a parse while it is written (``markdown_blocks``), about
    twice as often (docs/benchmarks.md, "The UI socket against the original socket").
    Greenlets share one thread, so the count needs no lock.
    """

    def __init__(self) -> None:
        self.streaming = 0

    def interval_after(self, render_seconds: float) -> float:
        return max(RENDER_INTERVAL_SECONDS,
                   render_seconds * max(1, self.streaming) / RENDER_CPU_SHARE)


RENDER_PACER = RenderPacer()


class ReplyWatching:
    """The watching half of ``ui_socket.ChatSocket`` (which provides what is declared here)."""

    ws: Any
    runtime: Runtime
    conversation: Conversation
    chats: UiChats
    reply_fragments: Callable[[Turn], ReplyFragments]

    def send(self, *fragments: str) -> None: ...

    def new_chat(self, draft: Any = None) -> None: ...

    def apply_settings(self, message: dict[str, Any]) -> None: ...

    def _composer(self, draft: str = "") -> str: ...

    def _parse(self, raw: Any) -> dict[str, Any] | None: ...

    def _watch(self, run: ReplyRun, turn: Turn, on_fail: Callable[[str], None] | None) -> None:
        """Relay the reply (fragments 2 and 3) from its whole text as it grows, watching the
        socket for Stop or New chat meanwhile. A closed socket raises out of here: this
        socket stops watching; the reply goes on (or not: ``ReplyRun.watching``)."""
        fragments = self.reply_fragments(turn)
        version, text, shown, command = -1, "", "", ""
        last_render, interval = 0.0, RENDER_INTERVAL_SECONDS
        counted = False  # in RENDER_PACER's count from the first text (not while queued)
        try:
            with run.watching():
                while run.ended is None:
                    pause = last_render + interval - time.monotonic()
                    if pause > 0 and text != shown:
                        # Rendered a moment ago: what comes meanwhile waits for the next
                        # render, so this socket is not woken for each token of it.
                        run.wait_for_end(min(pause, RELAY_POLL_SECONDS))
                    else:
                        run.wait_for(version, RELAY_POLL_SECONDS)
                    command = self._command_while_streaming(run)
                    if command or run.ended is not None:
                        break
                    version, text = run.version, run.text
                    if text and not counted:
                        RENDER_PACER.streaming += 1
                        counted = True
                    now = time.monotonic()
                    if text != shown and now - last_render >= interval:
                        update = fragments.update(text)
                        if update:
                            self.send(update)
                        interval = RENDER_PACER.interval_after(time.monotonic() - now)
                        shown, last_render = text, now
        finally:
            if counted:
                RENDER_PACER.streaming -= 1
        if command == "new":
            self.new_chat()
            return
        self._ended(run, turn, fragments, on_fail)

    def _ended(self, run: ReplyRun, turn: Turn, fragments: ReplyFragments,
               on_fail: Callable[[str], None] | None) -> None:
        end = run.ended
        self.chats.reload(self.conversation)
        if end.error:  # nothing was written, nothing stored
            if on_fail is not None:
                on_fail(end.error)
            else:
                self.send(messages_fragment(self.runtime, self.conversation),
                          error_fragment(end.error), self._composer())
            return
        whole = [t for t in self.conversation.turns if t.id == turn.id]
        alternatives = whole and (whole[0].prompt_flip or whole[0].reply_flip)
        self.send(fragments.end(run.text, end.note),
                  turn_fragment(whole[0]) if alternatives else
                  reply_meta_fragment(whole[0]) if whole else "", self._composer())

    def _command_while_streaming(self, run: ReplyRun) -> str:
        """"new" when this socket must stop watching; Stop stops the reply (its end is shown
        when it comes); answers other messages meanwhile."""
        while True:
            if self.ws.connected and not self.ws.input_buffer:
                return ""  # checked in place: receive(timeout=0) costs a trip through the hub
            raw = self.ws.receive(timeout=0)  # a closed socket raises here: it stops watching
            if raw is None:
                return ""
            message = self._parse(raw)
            if message is None:
                continue
            action = message.get("action") or "send"
            if action == "stop":
                run.stop()
            elif action == "new":
                return action
            elif action == "settings":
                self.apply_settings(message)  # they apply from the next reply on
            else:
                self.send(error_fragment(BUSY))


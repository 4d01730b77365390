"""The chat UI's socket at ``/ws/chat``: htmx's ws extension in, HTML fragments out.

One socket's life:

- **connect**: the Origin was checked before the upgrade (``security.py``). The socket attaches
  to the conversation named by ``?conversation=`` (a new one when unknown; see
  ``ui_conversation``) and sends the *sync*, so a page that reconnects shows what the server
  holds. If another socket was still writing a reply for that conversation, the reply is
  interrupted first (a reconnecting page takes its conversation over).
- **loop**: wait for a message, act on it, answer with fragments. A socket silent for
  ``socketIdleTimeoutSeconds`` is closed (code 1000, reason "idle"; the page reconnects when the
  person comes back).
- **close**: the reply being written for this socket is cancelled (what was written stays, noted
  "Interrupted."); the conversation is kept for a while so a reconnect can carry on.

Client to server: htmx sends a form's values as a JSON object plus a ``HEADERS`` object (ignored)::

    {"userPrompt": "…"}          send a message (the composer form)
    {"action": "stop"}           stop the reply being written
    {"action": "regenerate"}     write the last reply again
    {"action": "new"}            New chat: forget the conversation
    {"action": "settings", "model": "", "temperature": "0.7", "maxNewTokens": "512",
     "systemPrompt": ""}                               (``ui_settings``; no "model" with one
                                                        model served: no picker)

Server to client: each line below is one websocket message; every top-level element in it
carries ``hx-swap-oob`` (outerHTML by id unless said otherwise)::

    connect      #messages, #composer [, #settings-form on the page, not the widget]
    send         1   div[hx-swap-oob="beforeend:#messages"] > section#turn-N (the person's
                     message, article#turn-N-reply holding only div#turn-N-reply-open, the
                     reply's open end: aria-busy, typing dots), #composer (disabled, with
                     Stop), #chat-error (empty)
                 2…  the reply as block deltas (``ui_fragments.StreamedReply``, blocks found by
                     ``markdown_blocks``): div[hx-swap-oob="beforebegin:#turn-N-reply-open"]
                     with the Markdown blocks that just finished (each sent once), then
                     div#turn-N-reply-open with the open tail rendered again whole (left out
                     when it did not change); an open fenced code block grows by its whole
                     lines instead (appended before span#turn-N-reply-open-line, the line being
                     written, which is replaced). Rendering stays on the server; every piece
                     is whole blocks rendered from their whole text, or a code block's lines
                     escaped, never raw tokens appended to HTML. At most every
                     RENDER_INTERVAL_SECONDS (less often for long open blocks or many replies
                     at once: RenderPacer). Rarely (a reference definition for a [label]
                     already shown) the whole article#turn-N-reply.
                 3   the last finished blocks as in 2, div#turn-N-reply-open
                     hx-swap-oob="delete", the note (ended early, at the limit, empty) in a
                     div[hx-swap-oob="beforeend:#turn-N-reply .message__body"]: the article is
                     now exactly what a reconnect renders from history; #composer (enabled,
                     Regenerate on)
    regenerate   1   article#turn-N-reply (holding only its open end), #composer (disabled),
                     #chat-error (empty); then 2 and 3 as for send
    stop         the reply ends at once: 3, with the note "Stopped."
    new          #messages (empty), #composer, #chat-error (empty); while a reply streams, the
                 reply is stopped first (no step 3)
    settings     #settings-form (saved; or the bad fields named, and nothing changed, a
                 model not served here included). A new model chosen: also #model-chip,
                 #composer (its placeholder; the draft kept, as on connect) and, while the
                 conversation is empty, #messages (its welcome): each names the model. While a
                 reply streams they apply from the next reply on, the model too
                 (``ChatRequest.model``). A page keeps its chip across a reconnect (a new page
                 is a new conversation), so connect sends none.
    refused      #chat-error (why), #composer (enabled, the person's text put back):
                 bad input, maintenance, model loading, queue full, a reply already being
                 written, a model no longer served. An engine error after step 1 first
                 removes the turn (div#turn-N hx-swap-oob="delete"), or for regenerate
                 restores the old reply.
                 An unreadable message, or a message other than Stop, New chat or settings
                 while a reply streams: #chat-error alone (the reply goes on).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from flask import current_app, request
from flask_sock import Sock

from tanglebox.chat_request import ChatRequest, RequestError, parse_user_prompt
from tanglebox.client_json import decode_json
from tanglebox.generation import ENDED_EARLY, Delta, Done, Error, FinishReason, Generation
from tanglebox.prompting import USER, Message
from tanglebox.runtime import Refused, Runtime, current_runtime
from tanglebox.served_models import UnknownModel
from tanglebox.web.socket_inbox import bounded_inbox, close
from tanglebox.web.socket_writes import write_whole_frames
from tanglebox.web.ui_conversation import (
    PAGE,
    WIDGET,
    Conversation,
    ReplyInProgress,
    Turn,
    conversation_store,
    new_conversation,
)
from tanglebox.web.ui_fragments import (
    ReplyFragments,
    StreamedReply,
    composer_fragment,
    delete_fragment,
    error_fragment,
    messages_fragment,
    model_chip_fragment,
    new_turn_fragment,
    reply_fragment,
    settings_fragment,
)
from tanglebox.web.ui_settings import field_error, read_settings_form, settings_form_values

RENDER_INTERVAL_SECONDS = 0.08  # about 12 updates a second: smooth to read, cheap to render
RENDER_CPU_SHARE = 0.03  # of one core, for re-rendering every streaming reply of this process
TAKEOVER_WAIT_SECONDS = 2.0  # a reconnecting page waits this long for the old reply to end
IDLE_CLOSE_CODE = 1000  # a normal closure: htmx does not reconnect by itself; app.js does on use

BUSY = "A reply is still being written: wait for it, or press Stop."
FIELD_LABELS = {"userPrompt": "Message", "temperature": "Temperature",
                "maxNewTokens": "Max new tokens", "systemPrompt": "System prompt"}


class RenderPacer:
    """How often a streaming reply is rendered again, across every UI socket of the process.

    Each update (the open tail's Markdown parsed and rendered again, a finished block rendered
    once, then the send) takes CPU from the model on a CPU server. A reply is updated at most
    every ``RENDER_INTERVAL_SECONDS``, and less often when its update is slow (a long open
    block: a long list or code block) or many replies stream at once, so that updating all of
    them stays near ``RENDER_CPU_SHARE`` of one core. On a CPU server every core is busy with
    the model while replies stream, so this is taken from everyone's tokens: with 8 replies
    of about 500 characters (0.5 ms a render) each updates every ~150 ms instead of every
    80 (measured in docs/benchmarks.md, "Serving"). Greenlets share one thread, so the count
    needs no lock.
    """

    def __init__(self) -> None:
        self.streaming = 0

    def interval_after(self, render_seconds: float) -> float:
        return max(RENDER_INTERVAL_SECONDS,
                   render_seconds * max(1, self.streaming) / RENDER_CPU_SHARE)


RENDER_PACER = RenderPacer()


class Unreadable(ValueError):
    """A client message that is not the chat form's JSON object; the message says so."""


def register(sock: Sock) -> None:
    """Attach the socket route."""

    @sock.route("/ws/chat")
    def chat_socket(ws) -> None:
        runtime = current_runtime()
        write_whole_frames(ws)
        with bounded_inbox(ws, runtime.settings["maxRequestBytes"]):
            store = conversation_store(current_app)
            surface = WIDGET if request.args.get("surface") == WIDGET else PAGE
            conversation = store.attach(
                request.args.get("conversation"),
                lambda conversation_id: new_conversation(conversation_id, surface,
                                                         runtime.settings))
            try:
                ChatSocket(ws, runtime, conversation, f"ui:{request.remote_addr}").run()
            finally:
                store.detach(conversation)


def parse_message(raw: Any) -> dict[str, Any]:
    """A client message: a JSON object (htmx's ws-send), without its HEADERS.

    Decoded as every client's JSON is (:func:`decode_json`): a message nested too deeply or
    holding text that is not Unicode is Unreadable, never an exception out of the socket's
    loop (which would end the socket with an HTTP 500 written into it).
    """
    try:
        message = decode_json(raw, "message", "the chat form as JSON", of_params=True)
    except RequestError as err:
        raise Unreadable(f"The server could not read that message ({err}).") from None
    if not isinstance(message, dict):
        raise Unreadable("The server could not read that message (expected a JSON object).")
    message.pop("HEADERS", None)
    return message


def request_error(err: RequestError) -> str:
    return f"{FIELD_LABELS.get(err.param, err.param)}: {field_error(err)}"


class ChatSocket:
    """One UI socket: its conversation, and the loop that answers it."""

    # How a reply being written is sent (bench/ui_deltas.py measures another way beside it).
    reply_fragments: Callable[[Turn], ReplyFragments] = StreamedReply

    def __init__(self, ws, runtime: Runtime, conversation: Conversation,
                 client_id: str) -> None:
        self.ws = ws
        self.runtime = runtime
        self.conversation = conversation
        self.client_id = client_id

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        self._take_over()
        self.send(*self._sync())
        idle_timeout = self.runtime.settings["socketIdleTimeoutSeconds"]
        while True:
            raw = self.ws.receive(timeout=idle_timeout)
            if raw is None:
                close(self.ws, IDLE_CLOSE_CODE, "idle")
                return
            self.handle(raw)

    def handle(self, raw: Any) -> None:
        try:
            message = parse_message(raw)
        except Unreadable as err:
            self.send(error_fragment(str(err)))
            return
        action = message.get("action") or "send"
        if action == "send":
            self.send_prompt(message.get("userPrompt"))
        elif action == "regenerate":
            self.regenerate()
        elif action == "new":
            self.new_chat()
        elif action == "settings":
            self.apply_settings(message)
        elif action != "stop":  # a late Stop: the reply has already ended
            self.send(error_fragment(f"Unknown action {str(action)[:40]!r}."))

    def send(self, *fragments: str) -> None:
        self.ws.send("".join(fragments))

    # -- actions -----------------------------------------------------------------------

    def send_prompt(self, user_prompt: Any) -> None:
        draft = user_prompt if isinstance(user_prompt, str) else ""
        try:
            prompt = parse_user_prompt(user_prompt)
        except RequestError as err:
            self._refuse(request_error(err), draft)
            return
        generation = self._submit(self.conversation.history(), prompt, draft)
        if generation is None:
            return
        turn = self.conversation.add_turn(prompt)
        self.conversation.reply = ReplyInProgress(generation)
        self.send(new_turn_fragment(turn), self._composer(), error_fragment(""))
        self._stream(turn, previous=None)

    def regenerate(self) -> None:
        if not self.conversation.turns:
            self._refuse("There is no reply to write again yet.")
            return
        turn = self.conversation.turns[-1]
        generation = self._submit(self.conversation.history(before=turn), turn.prompt)
        if generation is None:
            return
        previous = (turn.reply, turn.note)
        turn.reply, turn.note = "", ""
        self.conversation.reply = ReplyInProgress(generation)
        self.send(reply_fragment(turn, "", streaming=True), self._composer(),
                  error_fragment(""))
        self._stream(turn, previous=previous)

    def new_chat(self) -> None:
        if self.conversation.busy:
            self._refuse(BUSY)
            return
        self.conversation.clear()
        self.send(messages_fragment(self.runtime, self.conversation), self._composer(),
                  error_fragment(""))

    def apply_settings(self, message: dict[str, Any]) -> None:
        """All values valid: applied to this conversation; else nothing changes."""
        if self.conversation.surface == WIDGET:
            self.send(error_fragment("The widget's settings are set by the server."))
            return
        chosen, shown, errors = read_settings_form(self.runtime, message)
        if chosen is None:
            self.send(settings_fragment(self.runtime, shown, errors,
                                        "Not applied: correct the marked field."))
            return
        previous_model = self.conversation.settings.model
        self.conversation.settings = chosen
        fragments = [settings_fragment(self.runtime, settings_form_values(chosen), {},
                                       "Applied to this conversation.")]
        if chosen.model != previous_model:  # where the page names the model
            fragments += [model_chip_fragment(self.runtime, self.conversation),
                          composer_fragment(self.runtime, self.conversation, keep_draft=True)]
            if not self.conversation.turns:
                fragments.append(messages_fragment(self.runtime, self.conversation))
        self.send(*fragments)

    # -- streaming a reply -------------------------------------------------------------

    def _submit(self, history: list[Message], prompt: str,
                draft: str = "") -> Generation | None:
        """Queue a reply with this conversation's settings, or say why not (a reply already
        being written, maintenance, loading, queue full) and return None."""
        if self.conversation.busy:
            self._refuse(BUSY, draft)
            return None
        chat = self.conversation.settings  # checked when they were applied
        try:
            return self.runtime.submit(ChatRequest(
                messages=(*history, Message(USER, prompt)), system_prompt=chat.system_prompt,
                temperature=chat.temperature, max_new_tokens=chat.max_new_tokens,
                client_id=self.client_id, model=chat.model or None))
        except Refused as refusal:
            self._refuse(refusal.message, draft)
        except UnknownModel as unknown:  # checked when applied (widgetModel: at start)
            self._refuse(f"The model {unknown.name} is not served here any more.", draft)
        return None

    def _stream(self, turn: Turn, previous: tuple[str, str] | None) -> None:
        """Relay the reply (fragments 2 and 3), watching the socket for Stop or New chat."""
        reply = self.conversation.reply
        fragments = self.reply_fragments(turn)
        text, shown, outcome, command = "", "", None, ""
        last_render, interval = 0.0, RENDER_INTERVAL_SECONDS
        counted = False  # in RENDER_PACER's count from the first token (not while queued)
        try:
            for event in reply.generation.relay(ticks=True):  # cancels it on a break or a raise
                if isinstance(event, Delta):
                    text += event.text
                    if not counted:
                        RENDER_PACER.streaming += 1
                        counted = True
                elif event is not None:
                    outcome = event
                    break
                command = self._command_while_streaming()
                if command or reply.interrupted:
                    break
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
            if outcome is None:  # Stop, New chat, a closed socket, or a reconnect took over
                turn.reply = text
                turn.note = ENDED_EARLY[FinishReason.CANCELLED] if command else "Interrupted."
            self.conversation.reply = None
            reply.finished.set()
        if reply.interrupted:
            return  # the socket that took over shows the conversation as it now stands
        if isinstance(outcome, Error) and not text:
            self._fail_turn(turn, previous, outcome.message)
            return
        if isinstance(outcome, Error):  # it failed mid-reply: keep what was written
            turn.reply, turn.note = text, outcome.message
        if isinstance(outcome, Done):
            turn.reply, turn.note = outcome.text, self._finish_note(outcome)
        if command == "new":
            self.new_chat()
        else:
            self.send(fragments.end(turn.reply, turn.note), self._composer())

    def _command_while_streaming(self) -> str:
        """"stop" or "new" when the reply must end now; answers other messages meanwhile."""
        while True:
            if self.ws.connected and not self.ws.input_buffer:
                return ""  # checked in place: receive(timeout=0) costs a trip through the hub
            raw = self.ws.receive(timeout=0)  # a closed socket raises here: the reply ends
            if raw is None:
                return ""
            try:
                message = parse_message(raw)
            except Unreadable as err:
                self.send(error_fragment(str(err)))
                continue
            action = message.get("action") or "send"
            if action in ("stop", "new"):
                return action
            if action == "settings":
                self.apply_settings(message)  # they apply from the next reply on
            else:
                self.send(error_fragment(BUSY))

    def _finish_note(self, done: Done) -> str:
        if done.finish_reason == FinishReason.LENGTH:
            return (f"Stopped at the limit of {self.conversation.settings.max_new_tokens} "
                    "new tokens.")
        if done.finish_reason in ENDED_EARLY:
            return ENDED_EARLY[done.finish_reason]
        return "" if done.text.strip() else "The model gave an empty reply."

    def _fail_turn(self, turn: Turn, previous: tuple[str, str] | None, message: str) -> None:
        """An engine error before any text: a new turn disappears (its text back in the
        composer); a regenerated reply goes back to what it was."""
        if previous is None:
            self.conversation.remove_turn(turn)
            self.send(delete_fragment(f"turn-{turn.id}"), error_fragment(message),
                      self._composer(draft=turn.prompt))
        else:
            turn.reply, turn.note = previous
            self.send(reply_fragment(turn, turn.reply, streaming=False, note=turn.note),
                      error_fragment(message), self._composer())

    # -- helpers -----------------------------------------------------------------------

    def _take_over(self) -> None:
        """A reconnecting page interrupts the reply its old socket may still be writing."""
        reply = self.conversation.reply
        if reply is not None:
            reply.interrupted = True
            reply.finished.wait(TAKEOVER_WAIT_SECONDS)

    def _sync(self) -> list[str]:
        fragments = [messages_fragment(self.runtime, self.conversation),
                     composer_fragment(self.runtime, self.conversation, keep_draft=True)]
        if self.conversation.surface == PAGE:
            fragments.append(settings_fragment(
                self.runtime, settings_form_values(self.conversation.settings), {}, ""))
        return fragments

    def _composer(self, draft: str = "") -> str:
        """The composer as the conversation stands: disabled while a reply is written."""
        return composer_fragment(self.runtime, self.conversation, draft=draft)

    def _refuse(self, message: str, draft: str = "") -> None:
        self.send(error_fragment(message), self._composer(draft=draft))

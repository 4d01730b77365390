"""The chat UI's socket at ``/ws/chat``: htmx's ws extension in, HTML fragments out.

A conversation lives in the database (``conversation_store``), and a reply being written
belongs to its conversation, not to a socket (``reply_runs``). One socket's life:

- **connect** (``/ws/chat?conversation=<id>[&page=<id>]``): the Origin was checked before the
  upgrade (``security.py``). The socket shows the stored conversation of this browser
  (``browser_identity``) named by ``conversation``, or the one this page has moved to since
  (its first message stored one, or New chat: ``UiChats.open``; ``page``, the page load's own
  random id, defaults to ``conversation``); anything else (unknown, another browser's,
  malformed) is a new conversation, stored with its first message. It sends the *sync*; if a
  reply is being written, it then watches it (``ui_reply_watch``): the reply so far, then the
  rest as it comes (no gap, no repeat: every update is made from the whole text).
- **loop**: wait for a message, act on it, answer with fragments. A socket silent for
  ``socketIdleTimeoutSeconds`` is closed (code 1000, reason "idle"; the page reconnects when the
  person comes back).
- **close**: the socket stops watching; the reply goes on and is saved (with
  ``finishRepliesWithoutWatchers`` false, the last socket leaving stops it, "Interrupted").

Client to server: htmx sends a form's values as a JSON object plus a ``HEADERS`` object (ignored)::

    {"userPrompt": "…"}          send a message (the composer form)
    {"action": "stop"}           stop the reply being written (from any socket of it)
    {"action": "regenerate"}     write the last reply again (the old one kept as an alternative)
    {"action": "edit", "userPrompt": "…"}   the last message, edited: an alternative of it,
                                 and a new reply
    {"action": "select", "message": "12"}   show the branch through this alternative ("‹ ›")
    {"action": "new"[, "userPrompt": "…"]}   New chat: a new conversation (the old one stays
                                 stored), the message that did not fit put in its composer
    {"action": "send-dropping", "userPrompt": "…"}   send it without the oldest turns: the
                                 fewest that likely fit (stored counts), one more each time the
                                 engine still says prompt_too_long; stored as the conversation's
                                 ``context_after``, a divider marks them
    {"action": "settings", "model": "", "temperature": "0.7", "maxNewTokens": "512",
     "systemPrompt": ""}                               (``ui_settings``; no "model" with one
                                                        model served: no picker)

Server to client: each line below is one websocket message; every top-level element in it
carries ``hx-swap-oob`` (outerHTML by id unless said otherwise)::

    connect      #messages (data-conversation-url: "/c/<id>", "/" while nothing is stored; the
                 page's address bar follows it), #composer [, #settings-form on the page, not
                 the widget]; a reply being written is in #messages with an empty open end,
                 then comes as in 2 and 3 below
    send         1   div[hx-swap-oob="beforeend:#messages"] > section#turn-N (the person's
                     message, article#turn-N-reply holding only div#turn-N-reply-open, the
                     reply's open end: aria-busy, typing dots); for a conversation's first
                     message #messages whole instead, holding that section (its
                     data-conversation-url is now "/c/<id>"); #composer (disabled, with
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
                     now exactly what a reconnect renders from history; div#turn-N-meta
                     (Copy, the speed, "Show prompt": ``reply_info``), or section#turn-N
                     whole when the turn has alternatives (its "‹ 2/2 ›"); #composer
                     (enabled, Regenerate on, the context meter)
    regenerate   1   article#turn-N-reply (holding only its open end; app.css hides the
                     old reply's div#turn-N-meta meanwhile), #composer (disabled),
                     #chat-error (empty); then 2 and 3 as for send
    edit         1   section#turn-N (the edited message, the reply's open end), #composer
                     (disabled), #chat-error (empty); then 2 and 3
    select       #messages (the branch through that message), #composer, #chat-error (empty)
    stop         the reply ends at once: 3, with the note "Stopped.", on every socket
                 watching it
    new          #messages (empty, data-conversation-url="/"), #composer, #chat-error (empty);
                 a reply being written goes on in its conversation (this socket stops watching)
    settings     #settings-form (saved; or the bad fields named, and nothing changed, a
                 model not served here included). A new model chosen: also #model-chip,
                 #composer (its placeholder; the draft kept, as on connect) and, while the
                 conversation is empty, #messages (its welcome): each names the model. While a
                 reply streams they apply from the next reply on, the model too
                 (``ChatRequest.model``). A page keeps its chip across a reconnect, so connect
                 sends none. Stored with the conversation.
    too long     (the engine's prompt_too_long) #chat-error with the choice: "Start a new
                 chat with it" (new) or "Continue without the oldest messages"
                 (send-dropping); sent as refused, below
    refused      #chat-error (why), #composer (enabled, the person's text put back):
                 bad input, maintenance, model loading, queue full, a reply already being
                 written, a model no longer served. An engine error after step 1 first
                 removes the turn (div#turn-N hx-swap-oob="delete"), or for regenerate
                 restores the old reply.
                 A socket that only watched a reply that failed gets #messages again.
                 An unreadable message, or a message other than Stop, New chat or settings
                 while a reply streams: #chat-error alone (the reply goes on).
"""

from __future__ import annotations

from typing import Any, Callable

from flask import current_app, request
from flask_sock import Sock

from tanglebox.chat_request import ChatRequest, RequestError, parse_user_prompt
from tanglebox.client_json import decode_json
from tanglebox.conversation_store import conversation_store
from tanglebox.generation import Generation
from tanglebox.prompting import USER, Message
from tanglebox.reply_runs import Busy, ReplyRun
from tanglebox.runtime import Refused, Runtime, current_runtime
from tanglebox.served_models import UnknownModel
from tanglebox.web.browser_identity import browser_id, embedding_site
from tanglebox.web.socket_inbox import bounded_inbox, close
from tanglebox.web.socket_writes import write_whole_frames
from tanglebox.web.ui_conversation import (
    CONVERSATION_ID,
    PAGE,
    WIDGET,
    Conversation,
    Turn,
    UiChats,
    new_conversation_id,
    page_conversations,
    reply_runs,
)
from tanglebox.web.ui_fragments import (
    ReplyFragments,
    StreamedReply,
    composer_fragment,
    error_fragment,
    messages_fragment,
    model_chip_fragment,
    reply_fragment,
    settings_fragment,
    turn_fragment,
)
from tanglebox.web.ui_reply_watch import (  # noqa: F401 - RenderPacer's names, as before
    BUSY,
    RENDER_CPU_SHARE,
    RENDER_INTERVAL_SECONDS,
    RENDER_PACER,
    RenderPacer,
    ReplyWatching,
)
from tanglebox.web.ui_sending import Sending
from tanglebox.web.ui_settings import field_error, read_settings_form, settings_form_values

IDLE_CLOSE_CODE = 1000  # a normal closure: htmx does not reconnect by itself; app.js does on use
FIELD_LABELS = {"userPrompt": "Message", "temperature": "Temperature",
                "maxNewTokens": "Max new tokens", "systemPrompt": "System prompt"}


class Unreadable(ValueError):
    """A client message that is not the chat form's JSON object; the message says so."""


def register(sock: Sock) -> None:
    """Attach the socket route."""

    @sock.route("/ws/chat")
    def chat_socket(ws) -> None:
        runtime = current_runtime()
        write_whole_frames(ws)
        with bounded_inbox(ws, runtime.settings["maxRequestBytes"]):
            chats = ui_chats(runtime)
            conversation = chats.open(request.args.get("conversation"))
            ChatSocket(ws, runtime, conversation, f"ui:{request.remote_addr}", chats).run()


def ui_chats(runtime: Runtime) -> UiChats:
    """This request's way to its browser's conversations."""
    surface = WIDGET if request.args.get("surface") == WIDGET else PAGE
    store = conversation_store(current_app)
    named = request.args.get("page") or ""
    page_id = named or request.args.get("conversation") or ""
    if not CONVERSATION_ID.match(page_id):
        page_id = new_conversation_id()
    return UiChats(store, reply_runs(current_app, store), page_conversations(current_app),
                   browser_id(surface), surface,
                   embedding_site(request.args.get("site", "")) if surface == WIDGET else "",
                   runtime.settings, page_id, page_named=bool(CONVERSATION_ID.match(named)))


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


class ChatSocket(ReplyWatching, Sending):
    """One UI socket: its conversation, and the loop that answers it."""

    # How a reply being written is sent (bench/ui_deltas.py measures another way beside it).
    reply_fragments: Callable[[Turn], ReplyFragments] = StreamedReply

    def __init__(self, ws, runtime: Runtime, conversation: Conversation, client_id: str,
                 chats: UiChats | None = None) -> None:
        self.ws = ws
        self.runtime = runtime
        self.conversation = conversation
        self.client_id = client_id
        self.chats = chats or ui_chats(runtime)  # (from the request: the socket's own)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> None:
        self.send(*self._sync())
        run = self._run()
        if run is not None and self.conversation.turns:
            self._watch(run, self.conversation.turns[-1], on_fail=None)
        idle_timeout = self.runtime.settings["socketIdleTimeoutSeconds"]
        while True:
            raw = self.ws.receive(timeout=idle_timeout)
            if raw is None:
                close(self.ws, IDLE_CLOSE_CODE, "idle")
                return
            self.handle(raw)

    def handle(self, raw: Any) -> None:
        message = self._parse(raw)
        if message is None:
            return
        action = message.get("action") or "send"
        if action in ("send", "send-dropping"):
            self.send_prompt(message.get("userPrompt"), drop_oldest=action == "send-dropping")
        elif action == "regenerate":
            self.regenerate()
        elif action == "edit":
            self.edit(message.get("userPrompt"))
        elif action == "select":
            self.select(message.get("message"))
        elif action == "new":
            self.new_chat(message.get("userPrompt"))
        elif action == "settings":
            self.apply_settings(message)
        elif action == "stop":  # from a page that did not watch it; or a late one: no reply
            run = self._run()
            if run is not None:
                run.stop()
        else:
            self.send(error_fragment(f"Unknown action {str(action)[:40]!r}."))

    def send(self, *fragments: str) -> None:
        self.ws.send("".join(fragments))

    # -- actions -----------------------------------------------------------------------

    def regenerate(self) -> None:
        turns = self.conversation.turns
        if not turns or turns[-1].prompt_message_id is None:
            self._refuse("There is no reply to write again yet.")
            return
        turn = turns[-1]
        run = self._start(self.conversation.history(before=turn), turn.prompt,
                          turn.prompt_message_id, None)
        if run is None:
            return
        previous = (turn.reply, turn.note, turn.info)
        turn.reply, turn.note, turn.info = "", "", None
        self.send(reply_fragment(turn, "", streaming=True), self._composer(),
                  error_fragment(""))  # its old #turn-N-meta is hidden while it streams

        def failed(message: str) -> None:
            turn.reply, turn.note, turn.info = previous
            self.send(reply_fragment(turn, turn.reply, streaming=False, note=turn.note),
                      error_fragment(message), self._composer())
        self._watch(run, turn, failed)

    def edit(self, user_prompt: Any) -> None:
        """The last message, edited: a new message beside it (same parent), and its reply."""
        turns = self.conversation.turns
        prompt, draft = self._read_prompt(user_prompt)
        if prompt is None:
            return
        if not turns or turns[-1].prompt_message_id is None:
            self._refuse("There is no message to edit yet.", draft)
            return
        turn = turns[-1]
        parent = turns[-2].reply_message_id if len(turns) > 1 else None
        run = self._start(self.conversation.history(before=turn), prompt, parent, prompt, draft)
        if run is None:
            return
        turn.prompt, turn.reply, turn.note = prompt, "", ""
        self.send(turn_fragment(turn, streaming=True), self._composer(), error_fragment(""))
        self._watch(run, turn, on_fail=None)

    def select(self, message_id: Any) -> None:
        """Show the branch through an alternative the page offered (its "‹ ›")."""
        if self.conversation.busy:
            self._refuse(BUSY)
            return
        offered = {flip_id for turn in self.conversation.turns
                   for flip in (turn.prompt_flip, turn.reply_flip) if flip
                   for flip_id in (flip.previous, flip.next) if flip_id}
        chosen = int(message_id) if str(message_id).isdigit() else None
        if chosen not in offered:
            self._refuse("That version is not part of this conversation.")
            return
        self.chats.store.select(self.conversation.id, chosen)
        self.chats.reload(self.conversation)
        self.send(messages_fragment(self.runtime, self.conversation), self._composer(),
                  error_fragment(""))

    def new_chat(self, draft: Any = None) -> None:
        """A new conversation; ``draft``: a message that did not fit the old one, put back."""
        self.conversation = self.chats.forget()
        self.send(messages_fragment(self.runtime, self.conversation),
                  self._composer(draft=draft if isinstance(draft, str) else ""),
                  error_fragment(""))

    def apply_settings(self, message: dict[str, Any]) -> None:
        """All values valid: applied to this conversation (and stored); else nothing changes."""
        if self.conversation.surface == WIDGET:
            self.send(error_fragment("The widget's settings are set by the server."))
            return
        chosen, shown, errors = read_settings_form(self.runtime, message)
        if chosen is None:
            self.send(settings_fragment(self.runtime, shown, errors,
                                        "Not applied: correct the marked field."))
            return
        previous_model = self.conversation.settings.model
        chosen.context_after = self.conversation.settings.context_after  # not a form field
        self.conversation.settings = chosen
        self.chats.save_settings(self.conversation)
        fragments = [settings_fragment(self.runtime, settings_form_values(chosen), {},
                                       "Applied to this conversation.")]
        if chosen.model != previous_model:  # where the page names the model
            fragments += [model_chip_fragment(self.runtime, self.conversation),
                          composer_fragment(self.runtime, self.conversation, keep_draft=True)]
            if not self.conversation.turns:
                fragments.append(messages_fragment(self.runtime, self.conversation))
        self.send(*fragments)

    # -- a reply ---------------------------------------------------------------------------

    def _start(self, history: list[Message], prompt: str, parent_id: int | None,
               new_message: str | None, draft: str = "") -> ReplyRun | None:
        """Queue a reply and hand it to its run (the conversation stored first when new), or
        say why not (a reply already being written, maintenance, loading, queue full) and
        return None."""
        if self.chats.runs.busy(self.conversation.id) or self.conversation.busy:
            self._refuse(BUSY, draft)
            return None
        generation = self._submit(history, prompt, draft)
        if generation is None:
            return None
        if not self.conversation.stored:
            self.chats.create(self.conversation)
        try:
            run = self.chats.runs.start(self.conversation.id, parent_id, new_message,
                                        generation, self._metadata())
        except Busy:
            self._refuse(BUSY, draft)
            return None
        self.conversation.busy = True
        return run

    def _submit(self, history: list[Message], prompt: str, draft: str) -> Generation | None:
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

    def _metadata(self) -> dict[str, Any]:
        """What is stored with the reply beside what its end brings (``reply_runs``)."""
        chat = self.conversation.settings
        model = chat.model or self.runtime.default_model_id
        engine = self.runtime.engine
        template = ("upstream" if model in self.runtime.remotes
                    else engine.template_name if engine is not None else None)
        return {"model": model, "seed": None, "template": template,
                "sampling": {"temperature": chat.temperature,
                             "maxNewTokens": chat.max_new_tokens,
                             "systemPrompt": chat.system_prompt}}

    # -- helpers -----------------------------------------------------------------------

    def _read_prompt(self, user_prompt: Any) -> tuple[str | None, str]:
        """The person's message and the draft to give back; None (refused) when invalid."""
        draft = user_prompt if isinstance(user_prompt, str) else ""
        try:
            return parse_user_prompt(user_prompt), draft
        except RequestError as err:
            self._refuse(request_error(err), draft)
            return None, draft

    def _parse(self, raw: Any) -> dict[str, Any] | None:
        """The client's message; None (and the error shown) when it is unreadable."""
        try:
            return parse_message(raw)
        except Unreadable as err:
            self.send(error_fragment(str(err)))
            return None

    def _run(self) -> ReplyRun | None:
        return self.chats.runs.get(self.conversation.id) if self.conversation.stored else None

    def _sync(self) -> list[str]:
        self.chats.reload(self.conversation)
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

"""The bridge from the conversation store (``conversation_store``) to the chat UI's socket.

A conversation lives in the database: a tree of messages, of which the page shows the current
branch. This module turns that branch into what the partials render (:class:`Conversation`,
its :class:`Turn` s, each message's alternatives "‹ 2/3 ›" as a :class:`Flip`), and keeps the
few things the socket needs beside the store:

- a page that has not sent anything yet has no stored conversation (empty chats are never
  stored): its socket URL names a random id; the first message creates the stored
  conversation, and :class:`PageConversations` remembers which one that page id now means, so
  a socket that reconnects with the page's id finds it (the page's URL becomes ``/c/<id>``
  from ``data-conversation-url``, so a reload finds it too);
- the reply being written (``reply_runs``) is shown as the branch up to the message it follows,
  then its turn with the text so far.

Everything here runs in the worker's one process; nothing yields between reading and writing
the in-memory maps, so no lock is needed.
"""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from flask import Flask

from tanglebox.prompting import ASSISTANT, USER, Message
from tanglebox.reply_runs import ReplyRun, ReplyRuns
from tanglebox.settings import Settings
from tanglebox.web.reply_info import ReplyInfo, reply_info

PAGE, WIDGET = "page", "widget"
CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
MAX_PAGES = 10_000  # page ids remembered; the oldest are forgotten first
RUNS_KEY, PAGES_KEY = "tanglebox.reply_runs", "tanglebox.ui_page_conversations"


@dataclass(frozen=True)
class Flip:
    """A message's place among its alternatives (the same parent and role): "‹ 2/3 ›"."""

    index: int  # from 1
    count: int
    previous: int | None  # the message ids the arrows select
    next: int | None


@dataclass
class Turn:
    """One exchange: what the person wrote and what the model answered."""

    id: int  # its place in the branch, from 1 (the page's ``turn-N``)
    prompt: str
    reply: str = ""
    note: str = ""  # why the reply ended early ("Stopped", ...); empty when it ended normally
    prompt_message_id: int | None = None
    reply_message_id: int | None = None
    prompt_flip: Flip | None = None
    reply_flip: Flip | None = None
    info: ReplyInfo | None = None  # the stored reply's speed, source and prompt


@dataclass
class ChatSettings:
    """This conversation's own settings (the settings panel; ``ui_settings``)."""

    temperature: float
    max_new_tokens: int
    system_prompt: str  # empty: the server's default
    model: str = ""  # a served model's id; empty: the default model
    # The last message not sent to the model any more (the person chose to continue with the
    # oldest turns dropped when the conversation outgrew the context); None: all are sent.
    context_after: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], defaults: "ChatSettings") -> "ChatSettings":
        known = {k: values[k] for k in asdict(defaults) if k in values}
        return cls(**{**asdict(defaults), **known})


@dataclass
class Conversation:
    """What the page shows: the current branch as turns, and this conversation's settings."""

    id: str  # the stored conversation's id, or the page's own while nothing is stored
    surface: str  # PAGE or WIDGET
    settings: ChatSettings
    turns: list[Turn] = field(default_factory=list)
    stored: bool = False
    busy: bool = False  # a reply is being written for it

    @property
    def url(self) -> str:
        """Where the page that shows it lives (``data-conversation-url``): ``/c/<id>``, or
        ``/`` while nothing is stored; the widget has none."""
        if self.surface != PAGE:
            return ""
        return f"/c/{self.id}" if self.stored else "/"

    @property
    def leaf_id(self) -> int | None:
        """The last message shown: what a new message follows."""
        if not self.turns:
            return None
        return self.turns[-1].reply_message_id or self.turns[-1].prompt_message_id

    def history(self, before: Turn | None = None, drop: int = 0) -> list[Message]:
        """The turns sent to the model (up to ``before``, excluded) as alternating
        user/assistant messages: without those before the dropped mark, and ``drop`` more."""
        messages = []
        for turn in self.turns[self.first_sent + drop:]:
            if turn is before:
                break
            messages += [Message(USER, turn.prompt), Message(ASSISTANT, turn.reply)]
        return messages

    @property
    def first_sent(self) -> int:
        """The index of the first turn sent to the model (after ``context_after``)."""
        mark = self.settings.context_after
        for index, turn in enumerate(self.turns):
            if mark is not None and turn.reply_message_id == mark:
                return index + 1
        return 0

    def add_turn(self, prompt: str) -> Turn:
        turn = Turn(len(self.turns) + 1, prompt)
        self.turns.append(turn)
        return turn


class Branch(Protocol):
    """The store's reads this module makes (``ConversationStore`` is one)."""

    def branch_with_alternatives(self, conversation_id: str
                                 ) -> list[tuple[Any, list[int]]]: ...


def new_conversation_id() -> str:
    return secrets.token_urlsafe(16)


def default_settings(surface: str, settings: Settings) -> ChatSettings:
    """The server's defaults (the widget's system prompt and model there)."""
    widget = surface == WIDGET
    return ChatSettings(
        temperature=float(settings["temperature"]), max_new_tokens=settings["maxNewTokens"],
        system_prompt=settings["widgetSystemPrompt"] if widget else "",
        model=settings["widgetModel"] if widget else "")


def new_conversation(conversation_id: str, surface: str, settings: Settings) -> Conversation:
    """A conversation not stored yet, with the server's defaults."""
    return Conversation(conversation_id, surface, default_settings(surface, settings))


def load_turns(store: Branch, conversation_id: str, run: ReplyRun | None) -> list[Turn]:
    """The current branch as turns; with a reply being written, the branch up to the message
    it follows, then its turn (its text so far)."""
    messages = store.branch_with_alternatives(conversation_id)
    if run is not None:
        ids = [m.id for m, _ in messages]
        messages = messages[:ids.index(run.parent_id) + 1] if run.parent_id in ids else []
    turns: list[Turn] = []
    for message, alternatives in messages:
        if message.role == USER:
            turns.append(Turn(len(turns) + 1, message.content, prompt_message_id=message.id,
                              prompt_flip=_flip(alternatives, message.id)))
        elif turns:
            turn = turns[-1]
            turn.reply, turn.note, turn.reply_message_id = (message.content, message.note,
                                                            message.id)
            turn.reply_flip = _flip(alternatives, message.id)
            turn.info = reply_info(message)
    if run is not None:
        if run.prompt is not None:
            turns.append(Turn(len(turns) + 1, run.prompt))
        if turns:
            turns[-1].reply, turns[-1].note, turns[-1].reply_flip = run.text, "", None
            turns[-1].info = None
    return turns


def _flip(ids: list[int], message_id: int) -> Flip | None:
    if len(ids) < 2 or message_id not in ids:
        return None
    at = ids.index(message_id)
    return Flip(at + 1, len(ids), ids[at - 1] if at > 0 else None,
                ids[at + 1] if at + 1 < len(ids) else None)


class PageConversations:
    """Which stored conversation a page's socket id means now (``None``: a new one).

    A page opened at ``/`` carries a random id; its first message stores a conversation with
    the store's own id, remembered here; New chat forgets it again, so a reconnecting socket
    of that page gets the conversation the page shows.
    """

    def __init__(self, limit: int = MAX_PAGES) -> None:
        self.limit = limit
        self._pages: OrderedDict[tuple[str, str], str | None] = OrderedDict()

    def resolve(self, owner: str, page_id: str) -> str | None:
        key = (owner, page_id)
        if key in self._pages:
            self._pages.move_to_end(key)
            return self._pages[key]
        return page_id

    def remember(self, owner: str, page_id: str, conversation_id: str | None) -> None:
        self._pages[(owner, page_id)] = conversation_id
        self._pages.move_to_end((owner, page_id))
        while len(self._pages) > self.limit:
            self._pages.popitem(last=False)


class Store(Branch, Protocol):
    """The store's calls the UI makes (``ConversationStore``)."""

    def get(self, conversation_id: str, owner: str) -> Any: ...

    def create(self, owner: str, surface: str, site: str, settings: dict) -> Any: ...

    def update_settings(self, conversation_id: str, settings: dict) -> None: ...

    def select(self, conversation_id: str, message_id: int) -> None: ...


@dataclass
class UiChats:
    """One socket's way to its person's conversations: the store, the replies being written,
    and which conversation its page id means."""

    store: Store
    runs: ReplyRuns
    pages: PageConversations
    owner: str  # the browser's id (browser_identity)
    surface: str
    site: str  # the widget's embedding site; "" on the page
    server_settings: Settings
    page_id: str  # the page's own id: ``page``, else ``conversation`` (the page's first)
    page_named: bool = False  # the socket URL had ``page``

    def open(self, conversation_id: str | None) -> Conversation:
        """The conversation this page shows: a stored one of this browser (and surface), else
        a new one, not stored yet. Another browser's is never shown: it is a new one here.

        What the page's id has come to mean (its first message stored one; New chat) counts
        when the page named itself (``page``), or when ``conversation`` is not a stored one
        (a new page's random id): a page opened at ``/c/<id>`` shows that conversation."""
        wanted = conversation_id if conversation_id and CONVERSATION_ID.match(
            conversation_id) else None
        stored = self.store.get(wanted, self.owner) if wanted else None
        if self.page_named or stored is None:
            moved_to = self.pages.resolve(self.owner, self.page_id)
            if moved_to != self.page_id:
                stored = self.store.get(moved_to, self.owner) if moved_to else None
        if stored is None or stored.surface != self.surface:
            return new_conversation(self.page_id, self.surface, self.server_settings)
        conversation = Conversation(stored.id, self.surface, ChatSettings.from_dict(
            stored.settings, default_settings(self.surface, self.server_settings)),
            stored=True)
        return self.reload(conversation)

    def reload(self, conversation: Conversation) -> Conversation:
        """Its branch and whether a reply is being written, as the store and runs hold them."""
        if conversation.stored:
            run = self.runs.get(conversation.id)
            conversation.turns = load_turns(self.store, conversation.id, run)
            conversation.busy = run is not None
        return conversation

    def create(self, conversation: Conversation) -> None:
        """Store the conversation (with its first message, which the reply run stores)."""
        stored = self.store.create(self.owner, self.surface, self.site,
                                   conversation.settings.as_dict())
        conversation.id, conversation.stored = stored.id, True
        self.pages.remember(self.owner, self.page_id, stored.id)

    def forget(self) -> Conversation:
        """New chat: this page shows a new conversation (stored with its first message)."""
        self.pages.remember(self.owner, self.page_id, None)
        return new_conversation(self.page_id, self.surface, self.server_settings)

    def save_settings(self, conversation: Conversation) -> None:
        if conversation.stored:
            self.store.update_settings(conversation.id, conversation.settings.as_dict())


def reply_runs(app: Flask, store: Any) -> ReplyRuns:
    """The app's replies being written (one map per app)."""
    runs = app.extensions.get(RUNS_KEY)
    if runs is None:
        settings = app.extensions["tanglebox"].settings
        runs = app.extensions[RUNS_KEY] = ReplyRuns(
            store, settings["finishRepliesWithoutWatchers"])
    return runs


def page_conversations(app: Flask) -> PageConversations:
    return app.extensions.setdefault(PAGES_KEY, PageConversations())

"""What the chat UI remembers about one conversation, and where it keeps it between sockets.

A page (``/`` or ``/widget``) is rendered with a fresh random conversation id in its socket URL.
The UI socket keeps that conversation (its turns and its settings) in the app's
:class:`ConversationStore`, so when htmx reconnects (the network blinked, the idle timeout
closed the socket) the page carries on where it was instead of talking to a model that has
forgotten everything on screen. Memory stays bounded: a conversation no socket is attached to
is forgotten after ``DETACHED_TTL_SECONDS``, and at most ``MAX_DETACHED`` of them are kept.
The store lives in the one worker process, used by its greenlets; none of its methods yields,
so no lock is needed.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from flask import Flask

from tanglebox.engine import Generation
from tanglebox.prompting import ASSISTANT, USER, Message
from tanglebox.settings import Settings

PAGE, WIDGET = "page", "widget"
DETACHED_TTL_SECONDS = 30 * 60
MAX_DETACHED = 500
CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
EXTENSION_KEY = "tanglebox.ui_conversations"


@dataclass
class Turn:
    """One exchange: what the person wrote and what the model answered."""

    id: int
    prompt: str
    reply: str = ""
    note: str = ""  # why the reply ended early ("Stopped", ...); empty when it ended normally


@dataclass
class ChatSettings:
    """This conversation's own settings (the settings panel; ``ui_settings``)."""

    temperature: float
    max_new_tokens: int
    system_prompt: str  # empty: the server's default
    model: str = ""  # a served model's id; empty: the default model


@dataclass
class ReplyInProgress:
    """The reply a socket is writing; a reconnecting socket may interrupt it."""

    generation: Generation
    interrupted: bool = False
    # Looked up at creation, not import: under gevent, threading is patched into greenlet-aware.
    finished: threading.Event = field(default_factory=lambda: threading.Event())


@dataclass
class Conversation:
    id: str
    surface: str  # PAGE or WIDGET
    settings: ChatSettings
    turns: list[Turn] = field(default_factory=list)
    reply: ReplyInProgress | None = None
    sockets: int = 0
    detached_at: float = 0.0
    _next_turn_id: int = 1

    @property
    def busy(self) -> bool:
        """A reply is being written (by whichever socket asked for it)."""
        return self.reply is not None

    def history(self, before: Turn | None = None) -> list[Message]:
        """The turns (up to ``before``, excluded) as alternating user/assistant messages."""
        messages = []
        for turn in self.turns:
            if turn is before:
                break
            messages += [Message(USER, turn.prompt), Message(ASSISTANT, turn.reply)]
        return messages

    def add_turn(self, prompt: str) -> Turn:
        turn = Turn(self._next_turn_id, prompt)
        self._next_turn_id += 1
        self.turns.append(turn)
        return turn

    def remove_turn(self, turn: Turn) -> None:
        self.turns.remove(turn)

    def clear(self) -> None:
        self.turns.clear()


def new_conversation_id() -> str:
    return secrets.token_urlsafe(16)


def new_conversation(conversation_id: str, surface: str, settings: Settings) -> Conversation:
    """A conversation with the server's defaults (and the widget's system prompt and model
    there)."""
    widget = surface == WIDGET
    return Conversation(conversation_id, surface, ChatSettings(
        temperature=float(settings["temperature"]), max_new_tokens=settings["maxNewTokens"],
        system_prompt=settings["widgetSystemPrompt"] if widget else "",
        model=settings["widgetModel"] if widget else ""))


class ConversationStore:
    """Conversations by id; detached ones expire, the oldest first."""

    def __init__(self, ttl: float = DETACHED_TTL_SECONDS, max_detached: int = MAX_DETACHED,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_detached = max_detached
        self.clock = clock
        self._conversations: dict[str, Conversation] = {}
        self._detached: OrderedDict[str, None] = OrderedDict()  # oldest detach first

    def attach(self, conversation_id: str | None,
               create: Callable[[str], Conversation]) -> Conversation:
        """The conversation with this id (a new one from ``create(id)`` if unknown or invalid)."""
        self._expire()
        if not conversation_id or not CONVERSATION_ID.match(conversation_id):
            conversation_id = new_conversation_id()
        conversation = self._conversations.get(conversation_id)
        if conversation is None:
            conversation = self._conversations[conversation_id] = create(conversation_id)
        self._detached.pop(conversation_id, None)
        conversation.sockets += 1
        return conversation

    def detach(self, conversation: Conversation) -> None:
        conversation.sockets -= 1
        if conversation.sockets <= 0 and conversation.id in self._conversations:
            conversation.detached_at = self.clock()
            self._detached[conversation.id] = None
            self._expire()

    def __len__(self) -> int:
        return len(self._conversations)

    def _expire(self) -> None:
        now = self.clock()
        while self._detached:
            oldest = next(iter(self._detached))
            conversation = self._conversations[oldest]
            if (len(self._detached) <= self.max_detached
                    and now - conversation.detached_at < self.ttl):
                break
            del self._detached[oldest]
            del self._conversations[oldest]


def conversation_store(app: Flask) -> ConversationStore:
    """The app's store (one per app, so two apps in one test process never share one)."""
    return app.extensions.setdefault(EXTENSION_KEY, ConversationStore())

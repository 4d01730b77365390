"""Conversations kept on the server: what the chat UI's history, its sockets and its replies
read and write.

A conversation belongs to one owner (a browser, ``web/browser_identity.py``) on one surface
(the page, or the widget of one embedding site). Its messages form a tree: regenerating a
reply or editing a prompt adds a sibling (same parent, same role) instead of overwriting, and
``current_leaf_id`` says which branch is shown. :meth:`ConversationStore.branch` reads that
branch; :meth:`~ConversationStore.select` moves to another one.

A reply is stored while it is written: at its first token with the person's message
(``start_reply``: the reply empty, state "writing"), then its text as it grows
(``save_writing``: every reply being written in one statement), then ``update_reply`` once at
its end, with its provenance (model, sampling, token counts, timings, finish reason). A process
that dies mid-reply leaves it "writing"; ``interrupt_unfinished`` at the next start marks it
"interrupted", keeping its text.

Every call is one short transaction, run in the calling greenlet: an ORM session
(``Database.session``), or for the writes of a reply's life, plain statements built once
(``Database.transaction``), which cost a fraction of a session's CPU on a busy server.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Iterable

from sqlalchemy import Connection, and_, bindparam, delete, exists, insert, or_, select, update

from tanglebox.database import EXTENSION as DATABASE_EXTENSION
from tanglebox.database import Database
from tanglebox.db_schema import ConversationRow, MessageRow

if TYPE_CHECKING:
    from flask import Flask

log = logging.getLogger(__name__)

EXTENSION = "tanglebox.conversation_store"
MESSAGE_STATES = ("writing", "done", "stopped", "interrupted", "failed")
ROLES = ("user", "assistant")
SURFACES = ("page", "widget")
INTERRUPTED_NOTE = "Interrupted"
# A deleted conversation can be restored (undo) this long; then it is removed for good, at the
# next start or the next delete.
DELETED_KEPT = timedelta(days=1)
TITLE_CHARS = 60
# What an assistant message records of how it was made (keyword arguments of add_message
# and update_reply).
METADATA_FIELDS = ("model", "template", "sampling", "seed", "prompt_tokens",
                   "completion_tokens", "cached_tokens", "timings", "finish_reason",
                   "prompt_text")


# The statements of a reply's life, built once (each build would cost about as much as running
# it): its first token (_add_messages), its text as it grows, its end (update_reply).
_TITLE = select(ConversationRow.title).where(ConversationRow.id == bindparam("conversation"))
_CONVERSATION_OF = select(MessageRow.conversation_id).where(MessageRow.id == bindparam("message"))
_INSERT_MESSAGE = insert(MessageRow).returning(MessageRow.id)
_NEW_LEAF = (update(ConversationRow).where(ConversationRow.id == bindparam("conversation"))
             .values(current_leaf_id=bindparam("leaf"), updated_at=bindparam("now"),
                     title=bindparam("new_title")))
_TOUCH = (update(ConversationRow).where(ConversationRow.id == bindparam("conversation"))
          .values(updated_at=bindparam("now")))
_UPDATE_MESSAGE = (update(MessageRow).where(MessageRow.id == bindparam("message"))
                   .returning(MessageRow.conversation_id))  # SET: the parameters given
_SAVE_WRITING = (update(MessageRow).where(MessageRow.id == bindparam("message"),
                                          MessageRow.state == "writing")
                 .values(content=bindparam("text")))


@dataclass(frozen=True)
class StoredMessage:
    id: int
    conversation_id: str
    parent_id: int | None  # the message it answers or follows; None for the first
    role: str  # "user" | "assistant"
    content: str
    state: str  # one of MESSAGE_STATES ("done" for user messages)
    note: str  # shown under a reply that ended early ("Stopped.", "Interrupted", ...)
    created_at: datetime  # aware UTC
    model: str | None = None
    template: str | None = None
    sampling: dict | None = None
    seed: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    timings: dict | None = None
    finish_reason: str | None = None
    prompt_text: str | None = None  # what the model read ("Show prompt"); None: not stored


@dataclass(frozen=True)
class ConversationSummary:
    id: str
    title: str
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class StoredConversation:
    id: str  # random, URL-safe
    owner: str
    surface: str  # "page" | "widget"
    site: str  # the widget's embedding origin; "" on the page
    title: str
    settings: dict  # the conversation's ChatSettings
    current_leaf_id: int | None  # the last message of the branch shown
    created_at: datetime
    updated_at: datetime


class ConversationStore:
    """Conversations and their message trees, in the app's database."""

    def __init__(self, database: Database) -> None:
        self.database = database

    def create(self, owner: str, surface: str, site: str, settings: dict) -> StoredConversation:
        if surface not in SURFACES:
            raise ValueError(f"surface must be one of {', '.join(SURFACES)}, got {surface!r}")
        now = _now()
        row = ConversationRow(id=secrets.token_urlsafe(16), owner=owner, surface=surface,
                              site=site, title="", settings=dict(settings),
                              current_leaf_id=None, created_at=now, updated_at=now)
        with self.database.session() as session:
            session.add(row)
            session.flush()
            return _conversation(row)

    def get(self, conversation_id: str, owner: str) -> StoredConversation | None:
        """None when unknown, deleted or another owner's: a caller cannot tell which."""
        with self.database.session() as session:
            row = _visible(session, conversation_id, owner)
            return _conversation(row) if row is not None else None

    def list(self, owner: str, surface: str, site: str, query: str = "",
             limit: int = 100) -> list[ConversationSummary]:
        """Newest first; ``query`` matches (case-insensitively, literally) the title or the
        text of any message. Conversations without a message are left out."""
        has_messages = exists().where(MessageRow.conversation_id == ConversationRow.id)
        statement = (select(ConversationRow)
                     .where(ConversationRow.owner == owner, ConversationRow.surface == surface,
                            ConversationRow.site == site, ConversationRow.deleted_at.is_(None),
                            has_messages)
                     .order_by(ConversationRow.updated_at.desc(), ConversationRow.id)
                     .limit(limit))
        if query:
            pattern = "%" + _escape_like(query) + "%"
            text_matches = exists().where(MessageRow.conversation_id == ConversationRow.id,
                                          MessageRow.content.ilike(pattern, escape="\\"))
            statement = statement.where(or_(ConversationRow.title.ilike(pattern, escape="\\"),
                                            text_matches))
        with self.database.session() as session:
            return [ConversationSummary(row.id, row.title, row.created_at, row.updated_at)
                    for row in session.scalars(statement)]

    def rename(self, conversation_id: str, owner: str, title: str) -> bool:
        with self.database.session() as session:
            row = _visible(session, conversation_id, owner)
            if row is None:
                return False
            row.title = title  # updated_at stays: a rename does not move it up the list
            return True

    def delete(self, conversation_id: str, owner: str) -> bool:
        """Hide the conversation at once; ``restore`` undoes it for DELETED_KEPT (older
        deletions are purged now)."""
        with self.database.session() as session:
            row = _visible(session, conversation_id, owner)
            if row is None:
                return False
            row.deleted_at = _now()
        self.purge_deleted(DELETED_KEPT)
        return True

    def restore(self, conversation_id: str, owner: str) -> bool:
        with self.database.session() as session:
            row = session.get(ConversationRow, conversation_id)
            if row is None or row.owner != owner or row.deleted_at is None:
                return False
            row.deleted_at = None
            return True

    def purge_deleted(self, older_than: timedelta) -> int:
        """Remove the conversations deleted more than ``older_than`` ago, with their messages."""
        cutoff = _now() - older_than
        with self.database.session() as session:
            # The ids once, so both deletes agree even if one is restored meanwhile.
            doomed = list(session.scalars(select(ConversationRow.id)
                                          .where(ConversationRow.deleted_at < cutoff)))
            if doomed:
                session.execute(delete(MessageRow).where(MessageRow.conversation_id.in_(doomed)))
                session.execute(delete(ConversationRow).where(ConversationRow.id.in_(doomed)))
            return len(doomed)

    def update_settings(self, conversation_id: str, settings: dict) -> None:
        with self.database.session() as session:
            session.execute(update(ConversationRow)
                            .where(ConversationRow.id == conversation_id)
                            .values(settings=dict(settings)))

    def branch(self, conversation_id: str) -> list[StoredMessage]:
        """The messages shown: from the root to the current leaf, in order."""
        return [message for message, _ in self.branch_with_alternatives(conversation_id)]

    def branch_with_alternatives(self, conversation_id: str
                                 ) -> list[tuple[StoredMessage, list[int]]]:
        """:meth:`branch`, each message with its :meth:`alternatives`, from one read of the
        conversation's messages (the page shows a "‹ 2/3 ›" beside each one)."""
        with self.database.session() as session:
            row = session.get(ConversationRow, conversation_id)
            if row is None or row.current_leaf_id is None:
                return []
            rows = list(session.scalars(
                select(MessageRow).where(MessageRow.conversation_id == conversation_id)))
        by_id = {m.id: m for m in rows}
        siblings = _siblings(rows)
        path: list[tuple[StoredMessage, list[int]]] = []
        message_id = row.current_leaf_id
        while message_id is not None and message_id in by_id:
            message = by_id[message_id]
            path.append((_message(message), siblings[message.parent_id, message.role]))
            message_id = message.parent_id
        return path[::-1]

    def alternatives(self, message_id: int) -> list[int]:
        """This message's id and its siblings' of the same role, oldest first: "‹ 2/3 ›"."""
        with self.database.session() as session:
            message = session.get(MessageRow, message_id)
            if message is None:
                return []
            rows = session.execute(
                select(MessageRow.id, MessageRow.parent_id, MessageRow.role)
                .where(MessageRow.conversation_id == message.conversation_id)).all()
        return _siblings(rows)[message.parent_id, message.role]

    def add_message(self, conversation_id: str, parent_id: int | None, role: str,
                    content: str, state: str = "done", **metadata: Any) -> StoredMessage:
        """A new message, which becomes the current leaf. The first user message names the
        conversation while it has no title."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        _check_fields(state, metadata)
        message = StoredMessage(id=0, conversation_id=conversation_id, parent_id=parent_id,
                                role=role, content=content, state=state, note="",
                                created_at=_now(), **metadata)
        with self.database.transaction() as connection:
            [message_id] = _add_messages(connection, [message])
        return replace(message, id=message_id)

    def start_reply(self, conversation_id: str, parent_id: int | None, prompt: str | None,
                    **metadata: Any) -> tuple[int | None, int]:
        """What a reply's first token stores, in one transaction: the person's message after
        ``parent_id`` (when ``prompt`` is not None; else ``parent_id`` is theirs), then the
        empty reply ("writing", with its provenance), which becomes the current leaf. Returns
        (the person's message id or None, the reply's id)."""
        _check_fields("writing", metadata)
        now = _now()
        reply = StoredMessage(id=0, conversation_id=conversation_id, parent_id=parent_id,
                              role="assistant", content="", state="writing", note="",
                              created_at=now, **metadata)
        if prompt is None:
            messages = [reply]
        else:
            messages = [StoredMessage(id=0, conversation_id=conversation_id,
                                      parent_id=parent_id, role="user", content=prompt,
                                      state="done", note="", created_at=now), reply]
        with self.database.transaction() as connection:
            ids = _add_messages(connection, messages)
        return (None if prompt is None else ids[0]), ids[-1]

    def update_reply(self, message_id: int, content: str, state: str, note: str = "",
                     **metadata: Any) -> None:
        """The reply's text so far (state "writing"), or at its end with its metadata."""
        _check_fields(state, metadata)
        with self.database.transaction() as connection:
            conversation_id = connection.execute(
                _UPDATE_MESSAGE, {"message": message_id, "content": content, "state": state,
                                  "note": note, **metadata}).scalar_one_or_none()
            if conversation_id is None:
                raise ValueError(f"no message {message_id}")
            connection.execute(_TOUCH, {"conversation": conversation_id, "now": _now()})

    def save_writing(self, texts: dict[int, str]) -> None:
        """The text so far of replies being written (message id: text), all in one transaction
        and one statement: the hot path of a busy server (about a tenth of ``update_reply``'s
        CPU for eight replies). A reply whose end was saved meanwhile keeps its end."""
        if not texts:
            return
        with self.database.transaction() as connection:
            connection.execute(_SAVE_WRITING, [{"message": message_id, "text": text}
                                               for message_id, text in texts.items()])

    def select(self, conversation_id: str, message_id: int) -> None:
        """Show the branch through ``message_id``: its newest descendant becomes the leaf
        (the newest child at each step)."""
        with self.database.session() as session:
            conversation = session.get(ConversationRow, conversation_id)
            message = session.get(MessageRow, message_id)
            if conversation is None or message is None or \
                    message.conversation_id != conversation_id:
                raise ValueError(f"message {message_id} is not in conversation "
                                 f"{conversation_id!r}")
            newest_child: dict[int, int] = {}
            for child_id, parent_id in session.execute(
                    select(MessageRow.id, MessageRow.parent_id)
                    .where(MessageRow.conversation_id == conversation_id,
                           MessageRow.parent_id.is_not(None))):
                newest_child[parent_id] = max(child_id, newest_child.get(parent_id, child_id))
            leaf = message_id
            while leaf in newest_child:
                leaf = newest_child[leaf]
            conversation.current_leaf_id = leaf

    def interrupt_unfinished(self) -> int:
        """At start-up: each reply still "writing" (its process died) becomes "interrupted",
        keeping its text. Returns how many."""
        with self.database.session() as session:
            return session.execute(update(MessageRow)
                                   .where(MessageRow.state == "writing")
                                   .values(state="interrupted", note=INTERRUPTED_NOTE)).rowcount


def open_conversations(app: Flask, database: Database) -> ConversationStore:
    """Put the database and its store in ``app`` (before it serves); replies a previous
    process left unfinished are marked interrupted."""
    app.extensions[DATABASE_EXTENSION] = database
    store = app.extensions[EXTENSION] = ConversationStore(database)
    interrupted = store.interrupt_unfinished()
    if interrupted:
        log.info("%d replies were being written when the server stopped: marked interrupted",
                 interrupted)
    store.purge_deleted(DELETED_KEPT)
    return store


def conversation_store(app: Flask) -> ConversationStore:
    """The app's store (opened with its database at start-up)."""
    return app.extensions[EXTENSION]


def title_from(text: str) -> str:
    """The first words of ``text``, up to about TITLE_CHARS characters, cut at a word."""
    words = " ".join(text.split())
    if len(words) <= TITLE_CHARS:
        return words
    cut = words[:TITLE_CHARS + 1].rsplit(" ", 1)[0] if " " in words[:TITLE_CHARS + 1] \
        else words[:TITLE_CHARS]
    return cut.rstrip(" ,.;:") + "…"


def _add_messages(connection: Connection, messages: list[StoredMessage]) -> list[int]:
    """Insert ``messages`` of one conversation, each after the one before it (the first after
    its own ``parent_id``); the last becomes the current leaf, and a user message names a
    conversation that has no title. Returns their ids. Plain statements, not the ORM: this is
    every reply's first token (about half the CPU)."""
    conversation_id, parent_id = messages[0].conversation_id, messages[0].parent_id
    title = connection.execute(_TITLE, {"conversation": conversation_id}).one_or_none()
    if title is None:
        raise ValueError(f"no conversation {conversation_id!r}")
    if parent_id is not None and connection.execute(
            _CONVERSATION_OF, {"message": parent_id}).scalar_one_or_none() != conversation_id:
        raise ValueError(f"message {parent_id} is not in conversation {conversation_id!r}")
    ids: list[int] = []
    for message in messages:
        parent_id = connection.execute(_INSERT_MESSAGE, {
            "conversation_id": conversation_id, "parent_id": parent_id, "role": message.role,
            "content": message.content, "state": message.state, "note": message.note,
            "created_at": message.created_at,
            **{key: getattr(message, key) for key in METADATA_FIELDS}}).scalar_one()
        ids.append(parent_id)
    named = [m.content for m in messages if m.role == "user"]
    connection.execute(_NEW_LEAF, {
        "conversation": conversation_id, "leaf": ids[-1], "now": messages[-1].created_at,
        "new_title": title[0] or (title_from(named[0]) if named else title[0])})
    return ids


def _visible(session: Any, conversation_id: str, owner: str) -> ConversationRow | None:
    row = session.get(ConversationRow, conversation_id)
    if row is None or row.owner != owner or row.deleted_at is not None:
        return None
    return row


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _check_fields(state: str, metadata: dict[str, Any]) -> None:
    if state not in MESSAGE_STATES:
        raise ValueError(f"state must be one of {', '.join(MESSAGE_STATES)}, got {state!r}")
    unknown = sorted(set(metadata) - set(METADATA_FIELDS))
    if unknown:
        raise TypeError(f"unknown message metadata: {', '.join(unknown)}; known: "
                        f"{', '.join(METADATA_FIELDS)}")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _conversation(row: ConversationRow) -> StoredConversation:
    return StoredConversation(id=row.id, owner=row.owner, surface=row.surface, site=row.site,
                              title=row.title, settings=dict(row.settings),
                              current_leaf_id=row.current_leaf_id, created_at=row.created_at,
                              updated_at=row.updated_at)


def _siblings(rows: Iterable[Any]) -> dict[tuple[int | None, str], list[int]]:
    """A conversation's messages (each with ``id``, ``parent_id``, ``role``) grouped as
    alternatives: by parent and role, the ids oldest first."""
    groups: dict[tuple[int | None, str], list[int]] = {}
    for m in sorted(rows, key=lambda m: m.id):
        groups.setdefault((m.parent_id, m.role), []).append(m.id)
    return groups


def _message(row: MessageRow) -> StoredMessage:
    return StoredMessage(id=row.id, conversation_id=row.conversation_id,
                         parent_id=row.parent_id, role=row.role, content=row.content,
                         state=row.state, note=row.note, created_at=row.created_at,
                         **{key: getattr(row, key) for key in METADATA_FIELDS})

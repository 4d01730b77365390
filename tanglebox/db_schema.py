"""The stored conversations as tables (SQLAlchemy 2 typed ORM).

A conversation is a tree of messages: each message names the one it answers or follows
(``parent_id``); the branch shown is the path from the root to ``current_leaf_id``. Deleting
a conversation only stamps ``deleted_at`` (undo), until ``purge_deleted`` removes it.

The tables change only through a migration (``tanglebox/migrations/versions``): a change here
without one would leave existing databases behind, so ``tests/unit/test_conversation_store_
migrations.py`` compares the migrated schema with this one.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, DateTime, ForeignKey, Index, Integer, String, Text,
                        TypeDecorator)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

OWNER_CHARS = 64  # SHA-256 hex of the browser's cookie
CONVERSATION_ID_CHARS = 32  # secrets.token_urlsafe(16) is 22


class UtcDateTime(TypeDecorator):
    """An aware UTC datetime in, an aware UTC datetime out (SQLite keeps no time zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: store aware UTC times only")
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else \
            value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class ConversationRow(Base):
    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(String(CONVERSATION_ID_CHARS), primary_key=True)
    owner: Mapped[str] = mapped_column(String(OWNER_CHARS))
    surface: Mapped[str] = mapped_column(String(16))
    site: Mapped[str] = mapped_column(Text)
    title: Mapped[str] = mapped_column(Text)
    settings: Mapped[dict] = mapped_column(JSON)
    # No foreign key: messages point at their conversation, and a key back would make the two
    # tables depend on each other (an insert order puzzle for no gain: the store sets it).
    current_leaf_id: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)

    __table_args__ = (
        # The sidebar's query: this browser's conversations on this surface, newest first.
        Index("ix_conversations_owner_surface_site_updated",
              "owner", "surface", "site", "updated_at"),
        Index("ix_conversations_deleted_at", "deleted_at"),
    )


class MessageRow(Base):
    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), index=True)
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    # An assistant message's provenance (None on user messages).
    model: Mapped[str | None] = mapped_column(Text)
    template: Mapped[str | None] = mapped_column(Text)
    sampling: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    cached_tokens: Mapped[int | None] = mapped_column(Integer)
    timings: Mapped[dict | None] = mapped_column(JSON(none_as_null=True))
    finish_reason: Mapped[str | None] = mapped_column(String(32))
    # What the model read (after the template; for a remote model, the messages sent upstream
    # as JSON, ``template`` "upstream"): "Show prompt". None before migration 0002.
    prompt_text: Mapped[str | None] = mapped_column(Text)

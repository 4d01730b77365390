"""The conversations database: open it, migrate it, hand out sessions.

At start-up the worker calls :func:`open_database` with ``databaseUrl``
(:func:`database_url`): it connects (a clear :class:`DatabaseError` when it cannot), then,
holding a lock, reads the schema revision and runs Alembic's ``upgrade head``
(``tanglebox/migrations``); a revision this code does not know means a newer Tanglebox wrote
the database, and that is an error too, never a guess. The lock makes instances that start at
once take turns: on PostgreSQL an advisory lock, on SQLite the write lock of
``BEGIN IMMEDIATE``. The second finds the schema current and changes nothing.

SQLite (the default, a file beside settings.json) is set up on every connection: WAL (readers
never wait for the writer) with ``synchronous=NORMAL``, a busy timeout (a writer waits for
another instead of failing), foreign keys on, and ``lower()`` that knows more than ASCII (the
search's ``ILIKE``). Every transaction starts with ``BEGIN IMMEDIATE``: one that reads then
writes can otherwise fail at once with "database is locked" when another process wrote in
between.

PostgreSQL goes through psycopg 3, which co-operates with gevent when it is imported after
gevent patched the process: the database is opened inside the worker (``create_app``), never
in gunicorn's master.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

if TYPE_CHECKING:
    from flask import Flask

    from tanglebox.settings import Settings

log = logging.getLogger(__name__)

EXTENSION = "tanglebox.database"
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_SECONDS = 15
CONNECT_TIMEOUT_SECONDS = 10
POOL_SIZE, POOL_OVERFLOW = 10, 20  # PostgreSQL connections kept, and opened beyond them
# pg_advisory_xact_lock's key: any constant the deployment's other programs do not use
# ("tangle" in ASCII).
MIGRATION_LOCK_KEY = 0x74616E676C65
SCHEMES = "sqlite:///FILE or postgresql+psycopg://USER:PASSWORD@HOST/NAME"


class DatabaseError(Exception):
    """The database cannot be used; the message is the one line to act on."""


class Database:
    """An engine, and sessions that commit when their block ends (or roll back on an error)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A connection in one transaction, for statements that need no ORM objects (cheaper
        than a session)."""
        with self.engine.begin() as connection:
            yield connection

    def close(self) -> None:
        self.engine.dispose()


def open_database(url: str) -> Database:
    """Connect to ``url`` and bring its schema up to date; DatabaseError says why not."""
    engine = _create_engine(_parse(url))
    shown = engine.url.render_as_string(hide_password=True)
    try:
        _migrate(engine)
    except DBAPIError as err:
        engine.dispose()
        raise DatabaseError(f"cannot use the database {shown}: {_first_line(err.orig)}") \
            from None
    except DatabaseError as err:
        engine.dispose()
        raise DatabaseError(f"the database {shown} {err}") from None
    return Database(engine)


def database_url(settings: Settings) -> str:
    """``databaseUrl``, with a relative SQLite path resolved beside settings.json."""
    url = _parse(settings["databaseUrl"])
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        url = url.set(database=str(settings.relative_path(url.database)))
    return url.render_as_string(hide_password=False)


def current_database(app: Flask) -> Database:
    """The app's database, opened at start-up."""
    return app.extensions[EXTENSION]


def _parse(url: str) -> URL:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DatabaseError(f"\"{url}\" is not a database URL; use {SCHEMES}") from None
    if parsed.drivername == "postgresql":  # SQLAlchemy's default driver would be psycopg2
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.drivername not in ("sqlite", "sqlite+pysqlite", "postgresql+psycopg"):
        raise DatabaseError(f"unknown database scheme \"{parsed.drivername}\"; use {SCHEMES}")
    return parsed


def _create_engine(url: URL) -> Engine:
    try:
        if url.get_backend_name() == "sqlite":
            return _sqlite_engine(url)
        # Under gevent a session waits for the server without holding the worker, so many
        # may be open at once (replies saving as they grow, sockets loading): a larger pool.
        return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE,
                             max_overflow=POOL_OVERFLOW,
                             connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS})
    except (ArgumentError, NoSuchModuleError) as err:
        raise DatabaseError(f"cannot use {url.render_as_string(hide_password=True)}: {err}") \
            from None


def _sqlite_engine(url: URL) -> Engine:
    in_memory = url.database in (None, "", ":memory:")
    # A greenlet may use a connection another one opened (gevent runs them on one thread, but
    # the pool hands connections across); in memory, every session must share the one
    # database, so one connection.
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_SECONDS},
        **({"poolclass": StaticPool} if in_memory else {}))

    @event.listens_for(engine, "connect")
    def set_up(dbapi_connection: sqlite3.Connection, record: Any) -> None:
        # Transactions are begun below, not by the sqlite3 module (which would not begin one
        # before a CREATE TABLE, so a migration would not be atomic).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        if not in_memory:
            cursor.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL syncs at checkpoints, not at each commit: a process that dies
            # loses nothing committed; only a power cut may lose the last commits (SQLite's
            # documentation, "PRAGMA synchronous"). Replies save about once a second each.
            cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_SECONDS * 1000}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()
        dbapi_connection.create_function("lower", 1, _lower, deterministic=True)

    @event.listens_for(engine, "begin")
    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _lower(text: Any) -> Any:
    return text.lower() if isinstance(text, str) else text


def _migrate(engine: Engine) -> None:
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    # Alembic says at INFO what it sets up on every start; what it changed is logged below.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    scripts = ScriptDirectory.from_config(config)
    with engine.connect() as connection, connection.begin():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        current = MigrationContext.configure(connection).get_current_revision()
        try:
            known = current is None or scripts.get_revision(current) is not None
        except CommandError:
            known = False
        if not known:
            raise DatabaseError(
                f"was written by a newer Tanglebox (schema revision {current}; this one knows "
                f"up to {scripts.get_current_head()}): upgrade Tanglebox, or set databaseUrl "
                "to another database")
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        if current != scripts.get_current_head():
            log.info("database schema: %s -> %s", current or "new", scripts.get_current_head())


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]

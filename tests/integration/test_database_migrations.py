"""Migrations at start-up, on SQLite and PostgreSQL: a fresh database gets the schema the code
declares, a current one is left as it is, instances starting at once take turns, and a
database a newer Tanglebox wrote is refused with one clear line."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, make_url, text

from tanglebox.conversation_store import ConversationStore
from tanglebox.database import MIGRATION_LOCK_KEY, DatabaseError, open_database
from tanglebox.db_schema import Base
from tests.conftest import ROOT
from tests.live_server import wait_until
from tests.postgres import database_url, postgres_server  # noqa: F401 - fixtures

HEAD = "0002"
STARTERS = 4  # processes opening one fresh database at once


def revision(url: str) -> str | None:
    engine = create_engine(url)
    with engine.connect() as connection:
        current = MigrationContext.configure(connection).get_current_revision()
    engine.dispose()
    return current


def test_a_fresh_database_gets_the_schema_the_code_declares(database_url):
    database = open_database(database_url)
    with database.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    database.close()
    assert differences == []
    assert revision(database_url) == HEAD


def test_a_current_database_is_opened_as_it_is(database_url):
    first = open_database(database_url)
    store = ConversationStore(first)
    conversation = store.create("a" * 64, "page", "", {"temperature": 0.5})
    store.add_message(conversation.id, None, "user", "still here?")
    first.close()
    again = open_database(database_url)
    assert [m.content for m in ConversationStore(again).branch(conversation.id)] == \
        ["still here?"]
    again.close()
    assert revision(database_url) == HEAD


def test_a_database_from_0001_gets_the_prompt_column_and_keeps_its_replies(database_url):
    """0002 adds ``messages.prompt_text``: replies stored before it keep their text, with no
    prompt (the UI says "not stored")."""
    from alembic import command
    from alembic.config import Config

    from tanglebox.database import MIGRATIONS
    engine = create_engine(database_url)
    with engine.begin() as connection:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
    engine.dispose()
    assert revision(database_url) == "0001"
    database = open_database(database_url)  # migrates to HEAD
    assert revision(database_url) == HEAD
    store = ConversationStore(database)
    conversation = store.create("a" * 64, "page", "", {})
    reply = store.add_message(conversation.id, None, "assistant", "hi", prompt_text="<s>hi")
    assert store.branch(conversation.id)[-1].prompt_text == "<s>hi" and reply.prompt_text
    database.close()


@contextmanager
def migration_lock_held(url: str) -> Iterator[Callable[[], int]]:
    """Hold the lock ``open_database`` migrates under, as an instance in mid-migration would;
    yields a count of the instances seen waiting for it (PostgreSQL; SQLite cannot tell)."""
    if url.startswith("sqlite"):
        connection = sqlite3.connect(make_url(url).database, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("BEGIN IMMEDIATE")
        yield lambda: STARTERS
        connection.execute("COMMIT")
        connection.close()
        return
    import psycopg
    parsed = make_url(url)
    with psycopg.connect(host=parsed.host, port=parsed.port, user=parsed.username,
                         dbname=parsed.database) as holder, \
            psycopg.connect(host=parsed.host, port=parsed.port, user=parsed.username,
                            dbname=parsed.database, autocommit=True) as watcher:
        holder.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        yield lambda: watcher.execute("SELECT count(*) FROM pg_locks WHERE locktype = "
                                      "'advisory' AND NOT granted").fetchone()[0]
        holder.commit()


def test_instances_starting_at_once_take_turns_to_migrate(database_url):
    """Several instances start while another one migrates: they wait for it, then each finds
    the schema current (without the lock, two CREATE TABLEs collide and one start fails)."""
    script = ("import sys\n"
              "from tanglebox.database import open_database\n"
              "print('ready', flush=True)\n"
              "open_database(sys.argv[1]).close()\n"
              "print('opened')\n")
    with migration_lock_held(database_url) as waiting:
        starters = [subprocess.Popen([sys.executable, "-c", script, database_url], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for _ in range(STARTERS)]
        assert [process.stdout.readline() for process in starters] == ["ready\n"] * STARTERS
        wait_until(lambda: waiting() == STARTERS, timeout=60,
                   what="every instance waiting for the migration lock")
    results = [(process.wait(timeout=120), *process.communicate()) for process in starters]
    assert [(code, out.strip()) for code, out, _ in results] == [(0, "opened")] * STARTERS, \
        "\n".join(err for _, _, err in results)
    assert revision(database_url) == HEAD


def test_a_database_from_a_newer_tanglebox_is_refused_and_left_alone(database_url):
    open_database(database_url).close()
    engine = create_engine(database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0042_future'"))
    engine.dispose()
    with pytest.raises(DatabaseError) as refused:
        open_database(database_url)
    message = str(refused.value)
    assert "was written by a newer Tanglebox (schema revision 0042_future; this one knows up " \
           f"to {HEAD}): upgrade Tanglebox" in message
    assert "\n" not in message
    assert revision(database_url) == "0042_future"

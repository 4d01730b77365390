"""The server opens its conversations database before it serves: a SQLite file beside
settings.json by default, replies a dead process left unfinished marked interrupted, and a
database it cannot use is one line and exit status 2."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest

from tanglebox.conversation_store import ConversationStore, conversation_store
from tanglebox.database import open_database
from tanglebox.db_schema import ConversationRow
from tanglebox.runtime import Runtime
from tanglebox.settings import load_settings
from tanglebox.web import create_app
from tests.commands import one_error_line, run_app
from tests.conftest import write_settings
from tests.live_server import free_port
from tests.postgres import postgres_server  # noqa: F401 - the fixture

# Nothing listens there: the settings serve a remote model, so no model loads before the
# worker opens the database.
NO_LOCAL_MODEL = {"modelName": "",
                  "remoteEndpoints": [{"name": "far", "baseUrl": "http://127.0.0.1:9/v1"}]}


def worker_error_line(result, *expected: str) -> str:
    """The one ``tanglebox: error:`` line of a server whose worker could not start (gunicorn
    adds its own lines about the worker after it), exit status 2."""
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("tanglebox: error: ")]
    assert len(lines) == 1, result.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_the_default_database_is_a_sqlite_file_beside_settings_json(app, tmp_path):
    store = conversation_store(app)
    conversation = store.create("a" * 64, "page", "", {})
    store.add_message(conversation.id, None, "user", "hello")
    with sqlite3.connect(tmp_path / "tanglebox.db") as connection:
        assert connection.execute("SELECT title FROM conversations").fetchall() == [("hello",)]
        assert connection.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_a_restart_keeps_a_reply_cut_short_and_marks_it_interrupted(tmp_path):
    settings = load_settings(write_settings(tmp_path))
    before = conversation_store(create_app(settings, Runtime(settings)))
    conversation = before.create("a" * 64, "page", "", {})
    question = before.add_message(conversation.id, None, "user", "Count to ten")
    reply = before.add_message(conversation.id, question.id, "assistant", "", state="writing")
    before.update_reply(reply.id, "1, 2, 3", "writing")
    after = conversation_store(create_app(settings, Runtime(settings)))  # the next start
    saved = after.branch(conversation.id)
    assert [(m.content, m.state, m.note) for m in saved] == [
        ("Count to ten", "done", ""), ("1, 2, 3", "interrupted", "Interrupted")]


def test_a_start_removes_for_good_what_was_deleted_over_a_day_ago(tmp_path):
    settings = load_settings(write_settings(tmp_path))
    before = conversation_store(create_app(settings, Runtime(settings)))
    conversation = before.create("a" * 64, "page", "", {})
    before.add_message(conversation.id, None, "user", "forget me")
    before.delete(conversation.id, "a" * 64)
    with before.database.session() as session:  # as if deleted two days ago
        session.get(ConversationRow, conversation.id).deleted_at -= timedelta(days=2)
    after = conversation_store(create_app(settings, Runtime(settings)))
    assert not after.restore(conversation.id, "a" * 64)
    assert after.branch(conversation.id) == []


def test_the_server_opens_a_postgresql_database_in_its_worker(fake_server, postgres_server):
    """Under gunicorn + gevent, with psycopg: migrated, and a reply a dead process left
    writing is marked interrupted, before /health says ok."""
    url = postgres_server.create_database()
    database = open_database(url)
    store = ConversationStore(database)
    conversation = store.create("a" * 64, "page", "", {})
    question = store.add_message(conversation.id, None, "user", "Still there?")
    store.add_message(conversation.id, question.id, "assistant", "Yes, I", state="writing")
    fake_server.start(fake={}, databaseUrl=url)
    assert [(m.content, m.state) for m in store.branch(conversation.id)] == [
        ("Still there?", "done"), ("Yes, I", "interrupted")]
    database.close()


def test_an_unknown_database_scheme_is_one_line_and_exit_2(tmp_path):
    path = write_settings(tmp_path, databaseUrl="mysql://chat:hunter2@db.example/chats")
    line = one_error_line(run_app(tmp_path, path), '"databaseUrl" must be sqlite:///FILE or '
                                                   'postgresql+psycopg://', 'starting "mysql"')
    assert "hunter2" not in line


@pytest.mark.parametrize("url, message", [
    ("postgresql+psycopg://tanglebox:hunter2@127.0.0.1:{port}/chats",
     "cannot use the database postgresql+psycopg://tanglebox:***@127.0.0.1"),
    ("sqlite:///no-such-folder/chats.db", "unable to open database file"),
])
def test_a_database_that_cannot_be_opened_is_one_line_and_exit_2(tmp_path, url, message):
    path = write_settings(tmp_path, port=free_port(), databaseUrl=url.format(port=free_port()),
                          **NO_LOCAL_MODEL)
    line = worker_error_line(run_app(tmp_path, path), '"databaseUrl"', message)
    assert "hunter2" not in line


def test_a_database_from_a_newer_tanglebox_is_one_line_and_exit_2(tmp_path):
    with sqlite3.connect(tmp_path / "newer.db") as connection:
        connection.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) PRIMARY KEY)")
        connection.execute("INSERT INTO alembic_version VALUES ('9999_from_the_future')")
    path = write_settings(tmp_path, port=free_port(), databaseUrl="sqlite:///newer.db",
                          **NO_LOCAL_MODEL)
    worker_error_line(run_app(tmp_path, path), "newer.db was written by a newer Tanglebox",
                   "9999_from_the_future", "upgrade Tanglebox")

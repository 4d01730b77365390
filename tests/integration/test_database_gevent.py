"""PostgreSQL under gevent, as in the gunicorn worker: a query waiting for the server lets the
other greenlets run (psycopg 3 co-operates when it is imported after gevent patched the
process, which is why the worker, not the master, opens the database)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT
from tests.postgres import postgres_server  # noqa: F401 - the fixture

# One greenlet holds an advisory lock; another asks for it and waits in PostgreSQL. The holder
# releases it only once it sees the other waiting (pg_locks): if the waiting query held the
# whole process, the holder could never look, and the lock_timeout would end the wait.
SCRIPT = """
from gevent import monkey
monkey.patch_all()
import sys, time
import gevent
from sqlalchemy import text
from tanglebox.database import open_database

database = open_database(sys.argv[1])

def waiter():
    with database.engine.connect() as connection:
        connection.execute(text("SET lock_timeout = '30s'"))
        connection.execute(text("SELECT pg_advisory_lock(4242)"))
        connection.execute(text("SELECT pg_advisory_unlock(4242)"))
    return "the waiter got the lock"

with database.engine.connect() as holder:
    holder.execute(text("SELECT pg_advisory_lock(4242)"))
    waiting = gevent.spawn(waiter)
    deadline = time.monotonic() + 60
    while not holder.execute(text("SELECT count(*) FROM pg_locks "
                                  "WHERE locktype = 'advisory' AND NOT granted")).scalar():
        if time.monotonic() > deadline or waiting.ready():
            sys.exit("never saw the waiter waiting while its query waited")
        gevent.sleep(0.01)  # polling interval
    holder.execute(text("SELECT pg_advisory_unlock(4242)"))
    print(waiting.get(timeout=60))
"""


def test_a_query_waiting_on_postgresql_lets_other_greenlets_run(postgres_server):
    result = subprocess.run([sys.executable, "-c", SCRIPT, postgres_server.create_database()],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.stdout.strip() == "the waiter got the lock", result.stderr[-2000:]

"""Alembic's environment: migrate the connection ``open_database`` hands over.

This folder holds the conversations database's migrations, run by
``tanglebox.database.open_database`` at start-up (no ``alembic.ini``: the script location is
this folder). It is not a Python package on purpose: this file runs Alembic at import, so
nothing but Alembic may import it. A new migration is a new file in ``versions/``, written by
hand after ``script.py.mako``, with ``down_revision`` the previous one's ``revision``.

``open_database`` opens the transaction (and, on PostgreSQL, takes the advisory lock) before
calling Alembic, so the migrations run inside it: one commit, and one process at a time.
"""

from alembic import context

from tanglebox.db_schema import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()

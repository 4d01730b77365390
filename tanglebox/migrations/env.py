"""Alembic's environment: migrate the connection ``open_database`` hands over.

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

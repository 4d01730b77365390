"""Alembic migrations of the conversations database, run by ``tanglebox.database.open_database``
at start-up (no ``alembic.ini``: the script location is this folder)."""

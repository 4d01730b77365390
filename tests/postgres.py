"""Databases for the storage tests: a SQLite file, and (step 2) a throwaway PostgreSQL."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite"])
def database_url(request, tmp_path) -> str:
    """A fresh, empty database of each kind, as a ``databaseUrl``."""
    return f"sqlite:///{tmp_path / 'conversations.db'}"

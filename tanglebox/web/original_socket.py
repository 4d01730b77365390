"""The original ("pure") websocket protocol at ``/`` (ORIGINAL.md)."""

from __future__ import annotations


def register(sock) -> None:
    """Attach the socket route."""

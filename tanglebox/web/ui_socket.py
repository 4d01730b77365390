"""The HTMX chat socket at ``/ws/chat``."""

from __future__ import annotations


def register(sock) -> None:
    """Attach the socket route."""

"""The chat UI's history: stored conversations of this browser (being built)."""

from __future__ import annotations

from flask import Blueprint

blueprint = Blueprint("history", __name__)

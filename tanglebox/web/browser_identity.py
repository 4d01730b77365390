"""Stand-in for helper H's browser_identity (branch h17): the lead drops this file at merge."""
import hashlib

from flask import request


def browser_id(surface: str | None = None) -> str:
    return hashlib.sha256(request.cookies.get("tanglebox_browser", "").encode()).hexdigest()

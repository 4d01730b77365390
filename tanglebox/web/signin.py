"""The chat UI behind API tokens: a sign-in page that turns a token into a session cookie.

When the UI requires a token (``uiRequiresToken``: ``auto`` follows ``isApiTokensRequired``),
the pages and the UI socket are served only to a browser that signed in:

    GET  /            no session ──► 303 /signin?next=/
    GET  /signin      a form that asks for an API token (from the token file)
    POST /signin      token valid ──► session cookie, 303 back; invalid ──► 401, the form again
    GET  /ws/chat     no session ──► 401 before the upgrade (a script gets no reply either)
    POST /signout     forget the session

The session cookie is Flask's signed cookie: HttpOnly, SameSite=Strict, Secure under TLS. It
holds the SHA-256 of the token, never the token, and every request checks that digest against
the token file again, so revoking a token (``python -m tanglebox tokens revoke NAME``) signs
its browsers out at once. The signing key is random per server process: a restart signs
everyone out. The widget follows the UI unless ``widgetOpen`` serves it (and its socket) to
anyone, for a public site.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta
from urllib.parse import urlencode

from flask import Blueprint, Flask, abort, redirect, render_template, request, session

from tanglebox.runtime import current_runtime
from tanglebox.web.auth import api_tokens
from tanglebox.web.security import allow_framing, is_websocket_handshake
from tanglebox.web.ui_conversation import CONVERSATION_ID, PAGE, WIDGET

SESSION_KEY = "token_sha256"
SESSION_DAYS = 30
GUARDED_PAGES = {"/": PAGE, "/widget": WIDGET}
SOCKET_PATH = "/ws/chat"
WRONG_TOKEN = "That token is not valid. Ask the server's operator for one."

blueprint = Blueprint("signin", __name__)


def init_app(app: Flask) -> None:
    settings = app.extensions["tanglebox"].settings
    app.secret_key = secrets.token_bytes(32)
    app.config.update(SESSION_COOKIE_NAME="tanglebox_session", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict",
                      SESSION_COOKIE_SECURE=bool(settings["useSsl"]),
                      PERMANENT_SESSION_LIFETIME=timedelta(days=SESSION_DAYS))
    app.before_request(_require_sign_in)
    app.register_blueprint(blueprint)


def ui_requires_token() -> bool:
    settings = current_runtime().settings
    choice = settings["uiRequiresToken"]
    return settings["isApiTokensRequired"] if choice == "auto" else choice == "yes"


def signed_in() -> bool:
    """True when this browser's session names a token that the token file still holds."""
    digest = session.get(SESSION_KEY)
    if not isinstance(digest, str):
        return False
    try:
        return api_tokens().owner_by_digest(bytes.fromhex(digest)) is not None
    except ValueError:
        return False


@blueprint.get("/signin")
def signin_form():
    _allow_widget_framing()
    return render_template("signin.html", next_path=_next_path(), error="")


@blueprint.post("/signin")
def signin():
    _allow_widget_framing()
    token = request.form.get("token", "").strip()
    if not token or api_tokens().owner(token) is None:
        return render_template("signin.html", next_path=_next_path(), error=WRONG_TOKEN), 401
    session.clear()
    session.permanent = True
    session[SESSION_KEY] = hashlib.sha256(token.encode("utf-8")).hexdigest()
    return redirect(_next_path(), code=303)


@blueprint.post("/signout")
def signout():
    session.clear()
    return redirect("/signin", code=303)


def _require_sign_in():
    """Before every request: the pages and the UI socket need a session when tokens do."""
    path = request.path
    if path == "/" and is_websocket_handshake():
        return None  # the original websocket protocol, behind the API token rule (auth.py)
    if path == SOCKET_PATH:
        surface = WIDGET if request.args.get("surface") == WIDGET else PAGE
    else:
        surface = GUARDED_PAGES.get(path)
    if surface is None or not ui_requires_token():
        return None
    if surface == WIDGET and current_runtime().settings["widgetOpen"]:
        return None
    if signed_in():
        return None
    if path == SOCKET_PATH:
        abort(401, description="Sign in at /signin first: the chat needs an API token.")
    return redirect("/signin?" + urlencode({"next": path}), code=303)


def _next_path() -> str:
    """Where to go after signing in: one of the guarded pages, never a URL from elsewhere."""
    wanted = request.values.get("next", "/")
    # ... or a stored conversation's page (``history.py``), where a link to it signed in to
    if wanted in GUARDED_PAGES or (wanted.startswith("/c/")
                                   and CONVERSATION_ID.fullmatch(wanted[len("/c/"):])):
        return wanted
    return "/"


def _allow_widget_framing() -> None:
    if _next_path() == "/widget":
        allow_framing(current_runtime().settings["widgetAllowedOrigins"])

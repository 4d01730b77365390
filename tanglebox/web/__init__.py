"""The Flask application factory: one blueprint (or socket route) per surface.

- ``pages``: the chat UI at ``/``, the widget at ``/widget``, ``/health``
- ``signin``: ``/signin``, when the chat UI asks for an API token
- ``history``: the chat UI's stored conversations: ``/c/<id>``, the sidebar, export, import
  (``browser_identity``: whose they are, a cookie per browser)
- ``api``: ``/conversation``, the original REST contract
- ``original_socket``: the original websocket protocol at ``/``
- ``ui_socket``: the HTMX chat socket at ``/ws/chat``
- ``openai_api``: the OpenAI-compatible API under ``/v1`` (its errors in OpenAI's shape)
- ``metrics_route``: Prometheus metrics at ``/metrics``, and every request counted

Before it serves, the app opens the conversations database (``databaseUrl``: migrated, replies
a dead process left unfinished marked interrupted) and keeps its ``ConversationStore`` in
``app.extensions`` (``conversation_store.conversation_store(app)``).

In front of the app, ``connection_limits.ConnectionGuard`` caps the connections per client
address and in total, and reads request bodies within a deadline.

A ``Refused`` (``Runtime.submit``: maintenance, loading, queue full...) raised in an HTTP view
is answered here, once for every HTTP surface: its status, its sentence, ``Retry-After``.
"""

from __future__ import annotations

import json
from pathlib import Path

from flask import Flask, Response, request
from flask_sock import Sock
from werkzeug.exceptions import HTTPException, default_exceptions

from tanglebox.conversation_store import open_conversations
from tanglebox.database import Database, database_url, open_database
from tanglebox.runtime import Refused, Runtime
from tanglebox.settings import Settings
from tanglebox.web import security
from tanglebox.web.connection_limits import ConnectionGuard, ConnectionLimits

ROOT = Path(__file__).resolve().parents[2]


def create_app(settings: Settings, runtime: Runtime | None = None,
               database: Database | None = None) -> Flask:
    """The app; it opens (and migrates) ``databaseUrl`` unless given ``database``: a
    DatabaseError is the start-up error."""
    app = Flask("tanglebox", root_path=str(ROOT), template_folder="templates",
                static_folder="static")
    app.extensions["tanglebox"] = runtime or Runtime(settings)
    open_conversations(app, database or open_database(database_url(settings)))
    app.config.update(
        MAX_CONTENT_LENGTH=settings["maxRequestBytes"],
        # Flask caps a form field at 500 kB by default; a form prompt may be as long as JSON.
        MAX_FORM_MEMORY_SIZE=settings["maxRequestBytes"],
        # A message over the limit closes the socket with 1009 (simple-websocket's rule).
        SOCK_SERVER_OPTIONS={"max_message_size": settings["maxRequestBytes"],
                             "ping_interval": 25},
        SEND_FILE_MAX_AGE_DEFAULT=3600,
    )
    app.json.sort_keys = False
    # In front of everything: caps on open connections, a deadline for bodies.
    app.wsgi_app = ConnectionGuard(app.wsgi_app, ConnectionLimits(
        total=settings["maxConnections"], per_client=settings["maxConnectionsPerClient"],
        read_timeout=float(settings["requestReadTimeoutSeconds"]),
        max_body=settings["maxRequestBytes"]))
    security.init_app(app)
    app.register_error_handler(HTTPException, error_response)
    app.register_error_handler(Refused, refusal_response)

    from tanglebox.web import (api, browser_identity, history, metrics_route, openai_api,
                               original_socket, pages, signin, ui_socket)
    from tanglebox.web.openai_wire import OpenAIError
    app.register_error_handler(OpenAIError, openai_api.openai_error)
    signin.init_app(app)
    browser_identity.init_app(app)
    sock = Sock(app)
    app.register_blueprint(pages.blueprint)
    app.register_blueprint(history.blueprint)
    app.register_blueprint(api.blueprint)
    app.register_blueprint(openai_api.blueprint)
    original_socket.register(sock)
    ui_socket.register(sock)
    metrics_route.init_app(app)
    return app


def wants_json() -> bool:
    best = request.accept_mimetypes.best_match(["text/plain", "application/json", "text/html"])
    return best == "application/json"


def error_response(error: HTTPException) -> Response:
    """Errors as plain text (what the original's clients read) or JSON when asked for; under
    ``/v1`` in OpenAI's shape."""
    from tanglebox.web import openai_api
    if openai_api.is_openai_path():
        return openai_api.http_error(error)
    message = error.description or error.name
    if wants_json():
        response = Response(
            json.dumps({"error": {"code": error.code, "message": message}}),
            status=error.code, mimetype="application/json")
    else:
        response = Response(message + "\n", status=error.code, mimetype="text/plain")
    for name, value in (error.get_headers() if hasattr(error, "get_headers") else []):
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response


def refusal_response(refusal: Refused) -> Response:
    """A request the server will not start now: its status and sentence, and Retry-After."""
    from tanglebox.web import openai_api
    if openai_api.is_openai_path():
        return openai_api.refusal(refusal)
    response = error_response(default_exceptions[refusal.status](refusal.message))
    response.headers["Retry-After"] = str(refusal.retry_after)
    return response

"""Pages: the chat UI at ``/`` (a new chat) and ``/c/<id>`` (a stored one, via ``history``),
the embeddable widget at ``/widget``, and ``/health``.

A chat page is rendered with its conversation (empty for a new chat; the stored current
branch for ``/c/<id>``), this browser's history in the sidebar, and the conversation's id in
its socket URL (``/ws/chat?conversation=…``); everything after that arrives over the socket
(``ui_socket``) as fragments of the same partials. A new chat is stored with its first
message (so empty chats never fill the history); the page's URL then becomes ``/c/<id>``.

The widget has no history list: it reopens this browser's latest conversation with the site
that embeds it (``browser_identity``: a partitioned cookie per embedding site), and New chat
starts another.
"""

from __future__ import annotations

from urllib.parse import urlencode

from flask import Blueprint, current_app, jsonify, render_template

from tanglebox.conversation_store import StoredConversation, conversation_store
from tanglebox.runtime import RuntimeState, current_runtime
from tanglebox.served_models import ModelStatus
from tanglebox.web.browser_identity import browser_id, embedding_site, widget_keeps_cookie
from tanglebox.web.history import history_items
from tanglebox.web.security import allow_framing
from tanglebox.web.signin import signed_in, ui_requires_token
from tanglebox.web.ui_conversation import (PAGE, WIDGET, UiChats, new_conversation_id,
                                           page_conversations, reply_runs)
from tanglebox.web.ui_fragments import ui_context

blueprint = Blueprint("pages", __name__)


@blueprint.get("/health")
def health():
    """503 while the local model loads (or if it failed), else 200 with the local model's
    backend and load; ``models`` gives every served model's state (a remote one that does not
    answer is ``unavailable``, with the reason, while the rest of the server works)."""
    runtime = current_runtime()
    models = [model_health(status) for status in runtime.model_statuses()]
    if runtime.local_model_id and runtime.state != RuntimeState.READY:
        body = {"status": runtime.state, "model": runtime.settings["modelName"]}
        if runtime.load_error:
            body["error"] = runtime.load_error
        response = jsonify({**body, "models": models})
        response.status_code = 503
        response.headers["Retry-After"] = "2"
        return response
    engine = runtime.engine
    if engine is None:  # remote models only
        return jsonify({"status": "ok", "model": runtime.default_model_id,
                        "maintenanceMode": runtime.settings["maintenanceMode"],
                        "models": models})
    backend = engine.backend
    return jsonify({
        "status": "ok",
        "model": backend.model_name,
        "backend": backend.name,
        "device": backend.device,
        "contextLength": backend.context_length,
        "maintenanceMode": runtime.settings["maintenanceMode"],
        **engine.load(),
        "models": models,
    })


def model_health(status: ModelStatus) -> dict:
    body = {"id": status.id, "kind": status.kind, "state": status.state}
    if status.detail:
        body["detail"] = status.detail
    return {**body, "busy": status.busy, "waiting": status.waiting, "capacity": status.capacity}


@blueprint.get("/")
def index():
    """The chat UI: a new chat."""
    return chat_page(None)


def chat_page(stored: StoredConversation | None) -> str:
    """The chat page with ``stored`` (None: a new chat) and the sidebar."""
    context = _chat_page_context(PAGE, stored)
    current_id = stored.id if stored else ""
    return render_template("index.html", history=history_items(current_id), query="",
                           current_id=current_id, **context)


@blueprint.get("/widget")
def widget():
    """The compact chat for an iframe; only ``widgetAllowedOrigins`` may frame it.

    The query string is never read: a prompt must not come from a link (SECURITY.md).
    """
    settings = current_runtime().settings
    allow_framing(settings["widgetAllowedOrigins"])
    site = embedding_site()
    latest = None
    if widget_keeps_cookie():
        store = conversation_store(current_app)
        newest = store.list(browser_id(WIDGET), WIDGET, site, limit=1)
        latest = store.get(newest[0].id, browser_id(WIDGET)) if newest else None
    return render_template("widget.html", widget_title=settings["widgetTitle"],
                           **_chat_page_context(WIDGET, latest, site))


def _chat_page_context(surface: str, stored: StoredConversation | None,
                       site: str = "") -> dict:
    """What the chat page renders: the conversation as the socket will show it (the same
    bridge, ``ui_conversation.UiChats``, a reply being written included), and its socket URL:
    the conversation's id, and this page's own id (``page``: what a New chat on this page
    comes to mean; each page load gets a new one)."""
    runtime = current_runtime()
    settings = runtime.settings
    store = conversation_store(current_app)
    page_id = new_conversation_id()
    chats = UiChats(store, reply_runs(current_app, store), page_conversations(current_app),
                    browser_id(surface), surface, site, settings, page_id)
    conversation = chats.open(stored.id if stored else None)
    query = {"conversation": conversation.id, "page": page_id, "surface": surface}
    if site:
        query["site"] = site
    return {
        **ui_context(runtime, conversation),
        "socket_url": "/ws/chat?" + urlencode(query),
        "maintenance_message": settings["maintenanceMessage"] if settings["maintenanceMode"]
        else "",
        "signed_in": ui_requires_token() and signed_in(),
    }

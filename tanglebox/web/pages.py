"""Pages: the chat UI at ``/``, the embeddable widget at ``/widget``, and ``/health``.

The chat pages are rendered with an empty conversation and a fresh conversation id in their
socket URL (``/ws/chat?conversation=…``); everything after that arrives over the socket
(``ui_socket``) as fragments of the same partials.
"""

from __future__ import annotations

from urllib.parse import urlencode

from flask import Blueprint, jsonify, render_template

from tanglebox.runtime import RuntimeState, current_runtime
from tanglebox.served_models import ModelStatus
from tanglebox.web.security import allow_framing
from tanglebox.web.signin import signed_in, ui_requires_token
from tanglebox.web.ui_conversation import PAGE, WIDGET, new_conversation, new_conversation_id
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
    """The chat UI."""
    return render_template("index.html", **_chat_page_context(PAGE))


@blueprint.get("/widget")
def widget():
    """The compact chat for an iframe; only ``widgetAllowedOrigins`` may frame it.

    The query string is never read: a prompt must not come from a link (SECURITY.md).
    """
    settings = current_runtime().settings
    allow_framing(settings["widgetAllowedOrigins"])
    return render_template("widget.html", widget_title=settings["widgetTitle"],
                           **_chat_page_context(WIDGET))


def _chat_page_context(surface: str) -> dict:
    runtime = current_runtime()
    conversation_id = new_conversation_id()
    conversation = new_conversation(conversation_id, surface, runtime.settings)
    settings = runtime.settings
    return {
        **ui_context(runtime, conversation),
        "socket_url": "/ws/chat?" + urlencode({"conversation": conversation_id,
                                               "surface": surface}),
        "maintenance_message": settings["maintenanceMessage"] if settings["maintenanceMode"]
        else "",
        "signed_in": ui_requires_token() and signed_in(),
    }

"""Pages: the chat UI at ``/``, the embeddable widget at ``/widget``, and ``/health``."""

from __future__ import annotations

from flask import Blueprint, jsonify, render_template

from tanglebox.runtime import READY, current_runtime

blueprint = Blueprint("pages", __name__)


@blueprint.get("/health")
def health():
    """503 while the model loads (or if it failed), 200 with model and backend when ready."""
    runtime = current_runtime()
    if runtime.state != READY:
        body = {"status": runtime.state, "model": runtime.settings["modelName"]}
        if runtime.load_error:
            body["error"] = runtime.load_error
        response = jsonify(body)
        response.status_code = 503
        response.headers["Retry-After"] = "2"
        return response
    engine = runtime.ready_engine()
    backend = engine.backend
    return jsonify({
        "status": "ok",
        "model": backend.model_name,
        "backend": backend.name,
        "device": backend.device,
        "contextLength": backend.context_length,
        "maintenanceMode": runtime.settings["maintenanceMode"],
        **engine.load(),
    })


@blueprint.get("/")
def index():
    runtime = current_runtime()
    return render_template("index.html", model_name=runtime.model_name, device=runtime.device)

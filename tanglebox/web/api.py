"""``/conversation``: the original REST contract (ORIGINAL.md)."""

from __future__ import annotations

from flask import Blueprint, Response, abort, request

from tanglebox.chat_request import RequestError, build_chat_request
from tanglebox.engine import Delta, Done, Error, QueueFull
from tanglebox.runtime import NotReady, current_runtime

blueprint = Blueprint("api", __name__)


@blueprint.route("/conversation", methods=["GET", "POST"])
def conversation():
    runtime = current_runtime()
    params = request.get_json(silent=True) if request.is_json else request.values
    try:
        chat_request = build_chat_request(params or {}, runtime.limits(),
                                          client_id=request.remote_addr or "",
                                          from_json=request.is_json)
        generation = runtime.ready_engine().submit(chat_request)
    except RequestError as err:
        abort(400, description=str(err))
    except (NotReady, QueueFull) as err:
        abort(503, description=str(err))
    text = ""
    for event in generation.events():
        if isinstance(event, Delta):
            text += event.text
        elif isinstance(event, Error):
            abort(400 if event.code == "prompt_too_long" else 500, description=event.message)
        elif isinstance(event, Done):
            text = event.text
    return Response(text, mimetype="text/plain")

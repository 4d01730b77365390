"""``/conversation``: the original REST contract (ORIGINAL.md), plus JSON and SSE replies.

The flow of one request, each step refusing with a clear 4xx/503 before any work is done:

1. parameters (after refusing pages of other sites that are not in ``allowedOrigins``):
   ``GET`` query string; ``POST`` JSON object or form (a ``POST`` with no body
   falls back to its query string). ``text/plain`` and other bodies are refused with 415,
   which also stops cross-site ``enctype=text/plain`` form posts. Over ``maxRequestBytes``: 413.
2. the API token (:mod:`tanglebox.web.auth`), then the server's state
   (``Runtime.check_open``): maintenance mode, a model still loading or failed to load, each
   a 503 + Retry-After;
3. validation, shared with every other adapter (:func:`build_chat_request`): 400 naming the
   parameter; the optional ``model`` must be a served model's id (``Runtime.chosen_model``);
4. ``runtime.submit``: 503 + Retry-After at once when the queue is full (or the server is
   shutting down); a ``Refused`` becomes its HTTP answer in ``tanglebox.web``;
5. the first event is awaited *before* a status line is sent, so a prompt longer than the
   context is a 400 with the token counts, also for streamed replies;
6. the events are rendered as the client asked (``Accept`` and ``shouldStreamResponse``):
   ``text/plain`` whole (the original's default) or chunked as generated, ``application/json``
   (one object), or ``text/event-stream`` (``delta``, then ``done`` or ``error`` events).

Steps 5 and 6 go through :mod:`tanglebox.web.http_relay`: a client that goes away is noticed
at the next event (or within the relay's poll while nothing is generated), and the relay
cancels the generation, which leaves the batch at the engine's next step.
"""

from __future__ import annotations

import functools
import json
from dataclasses import replace
from typing import Any, Mapping, NoReturn

from flask import Blueprint, Response, abort, jsonify, request
from werkzeug.exceptions import (BadGateway, InternalServerError, RequestEntityTooLarge,
                                 ServiceUnavailable, UnsupportedMediaType)

from tanglebox.chat_request import ChatRequest, RequestError, build_chat_request, parse_bool
from tanglebox.client_json import decode_json
from tanglebox.generation import Delta, Done, Error, ErrorCode, Event, FinishReason
from tanglebox.runtime import (LOADING_RETRY_AFTER, SHUTDOWN_RETRY_AFTER, Runtime,
                               current_runtime)
from tanglebox.web.auth import FORM_TYPES, require_api_enabled, require_token
from tanglebox.web.http_relay import (CLIENT_CLOSED_REQUEST, StreamCut, final_event,
                                      first_event, streamed)
from tanglebox.web.cors import add_cors_headers, options_response, refuse_cross_site_browsers

blueprint = Blueprint("api", __name__)
blueprint.before_request(require_api_enabled)

PLAIN, JSON, EVENT_STREAM = "text/plain", "application/json", "text/event-stream"
ALLOWED_METHODS = "GET, POST, OPTIONS"
BODY_EXAMPLE = '{"userPrompt": "Hello"}'


blueprint.after_request(add_cors_headers)


@blueprint.route("/conversation", methods=["GET", "POST", "OPTIONS"],
                 provide_automatic_options=False)
def conversation() -> Response:
    if request.method == "OPTIONS":
        return options_response(ALLOWED_METHODS)
    refuse_cross_site_browsers()
    params, from_json = read_parameters()
    require_token()
    runtime = current_runtime()
    runtime.check_open(runtime.known_model(params.get("model")))
    chat_request, stream = parse_request(params, from_json, runtime)
    reply_type = request.accept_mimetypes.best_match([PLAIN, JSON, EVENT_STREAM]) or PLAIN
    first, events = first_event(runtime.submit(chat_request))
    if first is None:
        return Response(status=CLIENT_CLOSED_REQUEST)
    if isinstance(first, Error):
        refuse(first)
    model = chat_request.model if chat_request.model in runtime.remotes else runtime.model_name
    if reply_type == EVENT_STREAM:
        return streamed(first, events, functools.partial(render_sse, model=model),
                        EVENT_STREAM)
    if reply_type == PLAIN and stream:
        return streamed(first, events, render_plain, PLAIN)
    done = final_event(first, events)
    if done is None:
        return Response(status=CLIENT_CLOSED_REQUEST)
    if isinstance(done, Error):
        refuse(done)  # the model failed mid-reply: nothing was sent yet
    if reply_type == JSON:
        return jsonify(reply_json(done, model))
    return Response(done.text, mimetype=PLAIN)


# -- 1. parameters ---------------------------------------------------------------------------

def read_parameters() -> tuple[Mapping[str, Any], bool]:
    """The request's parameters, and whether they came from JSON (numbers must be numbers)."""
    if request.method == "GET":
        return request.args, False
    limit = current_runtime().settings["maxRequestBytes"]
    if request.content_length is not None and request.content_length > limit:
        too_large(limit)  # before reading a byte of it
    if request.mimetype == "text/plain":
        raise UnsupportedMediaType(
            "Content-Type: text/plain is not accepted: send a JSON object "
            "(Content-Type: application/json) or a form (application/x-www-form-urlencoded).")
    body = read_body(limit)
    if request.is_json:
        return json_object(body), True
    if request.mimetype in FORM_TYPES:
        return request.form, False  # parsed from the body read above
    if not body:
        return request.args, False  # e.g. requests.post(url, params={...})
    raise UnsupportedMediaType(
        f"Content-Type: {request.mimetype or '(none)'} is not accepted: send a JSON object "
        "(Content-Type: application/json) or a form (application/x-www-form-urlencoded).")


def read_body(limit: int) -> bytes:
    # A chunked body (malformed, too slow or too large included) was read, or answered, by
    # connection_limits.ConnectionGuard in front of the app: here every body has a length.
    try:
        return request.get_data(cache=True)
    except RequestEntityTooLarge:
        too_large(limit)


def json_object(body: bytes) -> dict[str, Any]:
    try:
        value = decode_json(body, "body", BODY_EXAMPLE, of_params=True)
    except RequestError as err:
        abort(400, description=str(err))
    if not isinstance(value, dict):
        abort(400, description=f"body: must be a JSON object of parameters such as "
                               f"{BODY_EXAMPLE}, not {type_name(value)}")
    return value


def type_name(value: Any) -> str:
    names = {str: "a string", list: "an array", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), "that")


def too_large(limit: int) -> NoReturn:
    raise RequestEntityTooLarge(
        f"body: larger than this server accepts ({limit} bytes, the \"maxRequestBytes\" "
        "setting); shorten userPrompt or conversationHistory.")


# -- 3. validation ---------------------------------------------------------------------------

def parse_request(params: Mapping[str, Any], from_json: bool,
                  runtime: Runtime) -> tuple[ChatRequest, bool]:
    """The shared ChatRequest, and whether to stream; 400 naming the parameter otherwise."""
    try:
        chat_request = build_chat_request(params, runtime.limits(),
                                          client_id=request.remote_addr or "",
                                          from_json=from_json)
        chat_request = replace(chat_request, model=runtime.chosen_model(params.get("model")))
        stream = params.get("shouldStreamResponse")
        stream = False if stream is None or stream == "" else parse_bool(
            stream, "shouldStreamResponse")
    except RequestError as err:
        abort(400, description=str(err))
    return chat_request, stream


# -- 5. an engine error before the status line ---------------------------------------------

def refuse(error: Error) -> NoReturn:
    """An engine error before anything was sent: the status that says whose fault it is."""
    if error.code == ErrorCode.PROMPT_TOO_LONG:
        abort(400, description=f"userPrompt + conversationHistory: {error.message}")
    if error.code == ErrorCode.SHUTDOWN:
        raise ServiceUnavailable(error.message, retry_after=SHUTDOWN_RETRY_AFTER)
    if error.code == ErrorCode.UPSTREAM:  # a remote model's server failed
        raise BadGateway(error.message)
    if error.code == ErrorCode.UNAVAILABLE:
        raise ServiceUnavailable(error.message, retry_after=LOADING_RETRY_AFTER)
    raise InternalServerError(error.message)


# -- 6. rendering ----------------------------------------------------------------------------

def render_plain(event: Event) -> str:
    """A delta's text. Plain text has no way to say a reply was cut (the engine failed, the
    server shut down), so the stream ends without its final chunk then (``StreamCut``)."""
    if isinstance(event, Delta):
        return event.text
    if isinstance(event, Error) or event.finish_reason == FinishReason.SHUTDOWN:
        raise StreamCut(event.message if isinstance(event, Error) else event.finish_reason)
    return ""


def render_sse(event: Event, model: str) -> str:
    if isinstance(event, Delta):
        return sse("delta", {"text": event.text})
    if isinstance(event, Done):
        return sse("done", reply_json(event, model))
    return sse("error", {"code": event.code, "message": event.message})


def sse(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"  # json.dumps keeps it on one line


def reply_json(done: Done, model: str) -> dict[str, Any]:
    return {
        "response": done.text,
        "finishReason": done.finish_reason,
        "usage": {"promptTokens": done.prompt_tokens,
                  "completionTokens": done.completion_tokens},
        "timings": done.timings,
        "model": model,
    }

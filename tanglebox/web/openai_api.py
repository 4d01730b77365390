"""The OpenAI-compatible API under ``/v1``: a thin adapter on the one engine, like every surface.

- ``GET /v1/models``, ``GET /v1/models/<id>``: the served models: the local one (its id, from
  ``modelId`` or the model's name; its aliases, ``modelAliases``, are accepted too) and each
  remote one (``remoteEndpoints``, by ``name``); ``model`` chooses among them;
- ``POST /v1/chat/completions``, ``POST /v1/completions``: streamed (SSE ``data:`` chunks, then
  ``data: [DONE]``) or not;
- ``POST /v1/embeddings``: on the model's own weights (:mod:`tanglebox.embeddings`).

A request goes through the same doors as REST's, in the same order: ``enableApi`` (404), a
browser page of another origin (403 unless in ``allowedOrigins``, which also get CORS), the API
token (401; ``Authorization: Bearer``, the header the SDKs send), the server's state
(``Runtime.check_open``: 503 + Retry-After), the body (413, 400), validation (400 naming the
parameter: ``openai_request.py`` over ``chat_request.py``'s rules), the model (404
``model_not_found`` listing the ids), then ``runtime.submit`` (503 or 429 + Retry-After when the
queue is full). The first event is awaited before a status line is sent (``http_relay``), so a
prompt longer than the context is a 400 (``context_length_exceeded``) for streams too; a client
that goes away cancels its generation, which leaves the batch at the engine's next step.

A reply cut short after its stream began (the server shutting down, the model failing) ends
with an ``{"error": ...}`` chunk and no ``[DONE]``: the SDKs raise on it. Errors of every kind
under ``/v1`` are in OpenAI's shape (``openai_wire.error_response``, called by the app's error
handlers).
"""

from __future__ import annotations

import base64
import functools
from dataclasses import replace
from typing import Any, Callable, NoReturn

import numpy as np
from flask import Blueprint, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from tanglebox.chat_request import RequestError
from tanglebox.client_json import decode_json, shown
from tanglebox.embeddings import EmbeddingsUnsupported
from tanglebox.generation import (ENDED_EARLY, Delta, Done, Error, ErrorCode, Event,
                                  FinishReason)
from tanglebox.openai_request import (Capabilities, OpenAIRequest, parse_chat_completion,
                                      parse_completion, parse_embedding_input,
                                      parse_encoding_format, parse_model)
from tanglebox.runtime import (LOADING_RETRY_AFTER, SHUTDOWN_RETRY_AFTER, Refused, Runtime,
                               current_runtime)
from tanglebox.served_models import UnknownModel
from tanglebox.web import openai_wire as wire
from tanglebox.web.auth import require_api_enabled, require_token
from tanglebox.web.cors import add_cors_headers, options_response, refuse_cross_site_browsers
from tanglebox.web.http_relay import CLIENT_CLOSED_REQUEST, final_event, first_event, streamed

PREFIX = "/v1"
blueprint = Blueprint("openai", __name__, url_prefix=PREFIX)
blueprint.after_request(add_cors_headers)
ALLOWED_METHODS = "GET, POST, OPTIONS"
EVENT_STREAM = "text/event-stream"
OWNER = "tanglebox"


@blueprint.before_request
def admit() -> Response | None:
    """The doors every ``/v1`` request passes, before its view."""
    require_api_enabled()
    if request.method == "OPTIONS":
        return options_response(ALLOWED_METHODS)
    refuse_cross_site_browsers()
    require_token()
    return None


# -- models ----------------------------------------------------------------------------------

@blueprint.get("/models")
def list_models() -> Response:
    runtime = current_runtime()
    return jsonify({"object": "list",
                    "data": [model_object(runtime, name) for name in runtime.model_ids()]})


@blueprint.get("/models/<path:name>")
def get_model(name: str) -> Response:
    runtime = current_runtime()
    served_model(runtime, name)  # 404 unless it is a model's id or an alias
    return jsonify(model_object(runtime, name))


def model_object(runtime: Runtime, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(runtime.started_at),
            "owned_by": OWNER}


def served_model(runtime: Runtime, name: str | None) -> str:
    """The id of the served model ``name`` means (an id or an alias; None: the default),
    else 404."""
    try:
        return runtime.resolve_model(name)
    except UnknownModel as unknown:
        names = ", ".join([*unknown.available, *runtime.settings["modelAliases"]])
        raise wire.OpenAIError(404, f"The model {shown(name)} does not exist on this server; "
                                    f"use one of: {names} (GET /v1/models lists them).",
                               param="model", code="model_not_found") from None


# -- chat completions and completions --------------------------------------------------------

@blueprint.post("/chat/completions")
def chat_completions() -> Response:
    return complete(parse_chat_completion, ChatStream, chat_reply)


@blueprint.post("/completions")
def completions() -> Response:
    return complete(parse_completion, TextStream, text_reply)


def complete(parse: Callable[..., OpenAIRequest], stream_type: type,
             reply: Callable[[wire.ReplyHead, Done, OpenAIRequest], dict]) -> Response:
    body = json_body()
    runtime = current_runtime()
    runtime.check_open(runtime.known_model(body.get("model")))
    try:
        parsed = parse(body, runtime.limits(), capabilities(runtime, runtime.known_model(body.get("model"))),
                       client_id=request.remote_addr or "")
    except RequestError as err:
        invalid(err)
    model = served_model(runtime, parsed.model)
    first, events = first_event(runtime.submit(replace(parsed.chat, model=model)))
    if first is None:
        return Response(status=CLIENT_CLOSED_REQUEST)
    if isinstance(first, Error):
        refuse(first)
    head_of = functools.partial(wire.ReplyHead, model=model,
                                fingerprint=system_fingerprint(runtime, model))
    if parsed.stream:
        return streamed(first, events, stream_type(head_of, parsed), EVENT_STREAM)
    done = final_event(first, events)
    if done is None:
        return Response(status=CLIENT_CLOSED_REQUEST)
    if isinstance(done, Error):
        refuse(done)  # the model failed mid-reply: nothing was sent yet
    if done.finish_reason == FinishReason.SHUTDOWN:
        raise wire.OpenAIError(503, ENDED_EARLY[FinishReason.SHUTDOWN], code="shutdown",
                               retry_after=SHUTDOWN_RETRY_AFTER)
    return jsonify(reply(head_of, done, parsed))


def chat_reply(head_of: Callable, done: Done, parsed: OpenAIRequest) -> dict[str, Any]:
    return wire.chat_completion(head_of("chat.completion"), done, parsed.logprobs)


def text_reply(head_of: Callable, done: Done, parsed: OpenAIRequest) -> dict[str, Any]:
    reply = wire.text_completion(
        head_of("text_completion"), done.text, wire.finish_reason(done),
        wire.legacy_logprobs(done.logprobs, 0) if parsed.logprobs else None)
    return {**reply, "usage": wire.usage(done), "timings": done.timings}


class ChatStream:
    """Events → ``chat.completion.chunk`` SSE: the role first, then the text, then the finish
    reason, then (``include_usage``) the usage, then ``[DONE]``."""

    def __init__(self, head_of: Callable[[str], wire.ReplyHead], parsed: OpenAIRequest) -> None:
        self.head = head_of("chat.completion.chunk")
        self.parsed = parsed
        self.started = False

    def __call__(self, event: Event) -> str:
        out = ""
        if not self.started:
            self.started = True
            out = self.chunk({"role": "assistant", "content": ""}, logprobs=())
        if isinstance(event, Delta):
            return out + self.chunk({"content": event.text}, logprobs=event.logprobs)
        if isinstance(event, Error) or event.finish_reason not in wire.FINISH_REASONS:
            return out + cut_stream(event)
        out += self.chunk({}, finish=wire.finish_reason(event))
        if self.parsed.include_usage:
            out += wire.sse({**self.head.fields(), "choices": [], "usage": wire.usage(event),
                             "timings": event.timings})
        return out + wire.STREAM_END

    def chunk(self, delta: dict[str, Any], finish: str | None = None,
              logprobs: tuple = ()) -> str:
        return wire.sse(wire.chat_chunk(self.head, delta, finish,
                                        logprobs if self.parsed.logprobs else None,
                                        self.parsed.include_usage))


class TextStream:
    """Events → ``text_completion`` SSE chunks, then (``include_usage``) the usage, ``[DONE]``."""

    def __init__(self, head_of: Callable[[str], wire.ReplyHead], parsed: OpenAIRequest) -> None:
        self.head = head_of("text_completion")
        self.parsed = parsed
        self.offset = 0  # of the next token's text, for logprobs.text_offset

    def __call__(self, event: Event) -> str:
        if isinstance(event, Delta):
            return self.chunk(event.text, None, event.logprobs)
        if isinstance(event, Error) or event.finish_reason not in wire.FINISH_REASONS:
            return cut_stream(event)
        out = self.chunk("", wire.finish_reason(event), ())
        if self.parsed.include_usage:
            out += wire.sse({**wire.text_completion(self.head, "", None, None), "choices": [],
                             "usage": wire.usage(event)})
        return out + wire.STREAM_END

    def chunk(self, text: str, finish: str | None, logprobs: tuple) -> str:
        entries = None
        if self.parsed.logprobs:
            entries = wire.legacy_logprobs(logprobs, self.offset)
            self.offset += sum(len(entry.token) for entry in logprobs)
        chunk = wire.text_completion(self.head, text, finish, entries)
        if self.parsed.include_usage:
            chunk["usage"] = None
        return wire.sse(chunk)


def cut_stream(event: Error | Done) -> str:
    """A reply that ended before the model finished it, after its stream began: an error
    chunk (the SDKs raise on it), no ``[DONE]``. A cancelled reply has nobody to tell."""
    if isinstance(event, Done) and event.finish_reason == FinishReason.CANCELLED:
        return ""
    message = event.message if isinstance(event, Error) else ENDED_EARLY[event.finish_reason]
    code = event.code if isinstance(event, Error) else event.finish_reason
    return wire.sse(wire.error_body(503 if code == FinishReason.SHUTDOWN else 500,
                                    message, code=str(code)))


# -- embeddings ------------------------------------------------------------------------------

@blueprint.post("/embeddings")
def embeddings() -> Response:
    body = json_body()
    runtime = current_runtime()
    runtime.check_open(runtime.local_model_id)
    try:
        model = served_model(runtime, parse_model(body.get("model")))
        if model != runtime.local_model_id:
            raise wire.OpenAIError(400, f"The model {model} is a remote model; embeddings are "
                                        "made by the local model only.", param="model",
                                   code="model_cannot_embed")
        texts = parse_embedding_input(body.get("input"))
        encoding = parse_encoding_format(body.get("encoding_format"))
        result = runtime.embedder().embed(texts)
    except RequestError as err:
        invalid(err)
    except EmbeddingsUnsupported as err:
        raise wire.OpenAIError(400, str(err), param="model", code="model_cannot_embed") from None
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != result.dimensions:
        raise wire.OpenAIError(400, f"dimensions: this model's embeddings have "
                                    f"{result.dimensions} dimensions and cannot be shortened; "
                                    "leave dimensions out", param="dimensions")
    data = [{"object": "embedding", "index": index, "embedding": encode(vector, encoding)}
            for index, vector in enumerate(result.vectors)]
    return jsonify({"object": "list", "data": data, "model": model,
                    "usage": {"prompt_tokens": result.prompt_tokens,
                              "total_tokens": result.prompt_tokens}})


def encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    """``float``: a JSON array; ``base64``: the little-endian float32 bytes, as OpenAI sends."""
    if encoding == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return [float(x) for x in vector]


# -- the doors -------------------------------------------------------------------------------

def json_body() -> dict[str, Any]:
    """The request's JSON object (whatever its Content-Type: curl's -d sends a form type)."""
    limit = current_runtime().settings["maxRequestBytes"]
    if request.content_length is not None and request.content_length > limit:
        too_large(limit)
    try:
        data = request.get_data(cache=True)
    except HTTPException as err:
        if err.code == 413:
            too_large(limit)
        raise
    try:
        value = decode_json(data, "body", '{"model": "...", "messages": [...]}', of_params=True)
    except RequestError as err:
        invalid(err)
    if not isinstance(value, dict):
        raise wire.OpenAIError(400, "body: must be a JSON object")
    return value


def too_large(limit: int) -> NoReturn:
    raise wire.OpenAIError(413, f"body: larger than this server accepts ({limit} bytes, the "
                                "\"maxRequestBytes\" setting); shorten the messages.")


def invalid(err: RequestError) -> NoReturn:
    raise wire.OpenAIError(400, str(err), param=err.param)


def refuse(error: Error) -> NoReturn:
    """An engine error before anything was sent: the status that says whose fault it is."""
    if error.code == ErrorCode.PROMPT_TOO_LONG:
        raise wire.OpenAIError(400, error.message, param="messages",
                               code="context_length_exceeded")
    if error.code == ErrorCode.GRAMMAR:
        raise wire.OpenAIError(400, error.message, param="response_format")
    if error.code == ErrorCode.SHUTDOWN:
        raise wire.OpenAIError(503, error.message, code="shutdown",
                               retry_after=SHUTDOWN_RETRY_AFTER)
    if error.code == ErrorCode.UPSTREAM:  # a remote model's server failed: not ours, not yours
        raise wire.OpenAIError(502, error.message, code="upstream_error")
    if error.code == ErrorCode.UNAVAILABLE:
        raise wire.OpenAIError(503, error.message, code="model_unavailable",
                               retry_after=LOADING_RETRY_AFTER)
    raise wire.OpenAIError(500, error.message, code=str(error.code))


def capabilities(runtime: Runtime, model: str | None = None) -> Capabilities:
    """What ``model`` (None: the default) can do; a remote model: what is passed on as is."""
    remote = runtime.remotes.get(model or runtime.default_model_id)
    if remote is not None:
        return Capabilities(grammar=False, vocabulary_size=2 ** 31 - 1,
                            backend=f"the remote model {remote.name}", logprobs=False)
    backend = runtime.engine.backend
    return Capabilities(grammar=bool(getattr(backend, "supports_grammar", False)),
                        vocabulary_size=getattr(backend, "vocabulary_size", 2 ** 31 - 1),
                        backend=backend.name)


def system_fingerprint(runtime: Runtime, model: str) -> str:
    remote = runtime.remotes.get(model)
    if remote is not None:
        return wire.fingerprint(model, "remote", remote.upstream.base_url, 0, "upstream")
    backend = runtime.engine.backend
    return wire.fingerprint(model, backend.name, backend.device,
                            backend.context_length, runtime.settings["conversationTemplate"])


# -- errors in OpenAI's shape (called by the app's handlers for every path under /v1) --------

def is_openai_path() -> bool:
    return request.path == PREFIX or request.path.startswith(PREFIX + "/")


def http_error(error: HTTPException) -> Response:
    headers = error.get_headers() if hasattr(error, "get_headers") else []
    return wire.error_response(error.code or 500, error.description or error.name,
                               headers=headers)


def openai_error(error: wire.OpenAIError) -> Response:
    return wire.error_response(error.status, error.message, error.param, error.code,
                               [("Retry-After", str(error.retry_after))]
                               if error.retry_after else [])


def refusal(refused: Refused) -> Response:
    return wire.error_response(refused.status, refused.message, code=str(refused.reason),
                               headers=[("Retry-After", str(refused.retry_after))])

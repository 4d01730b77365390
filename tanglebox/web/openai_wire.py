"""OpenAI's response shapes: completions, stream chunks, log probabilities, usage, errors.

Only shapes live here (what the ``openai`` SDK validates, field by field); which events become
which chunks is :mod:`tanglebox.web.openai_api`'s. Every object carries ``id``, ``object``,
``created``, ``model`` and ``system_fingerprint``; ``usage`` reports the prompt tokens reused
from the conversation's cached prefix as ``prompt_tokens_details.cached_tokens``.

Errors are ``{"error": {"message", "type", "param", "code"}}`` with the status's type
(``invalid_request_error`` for a 400, ``authentication_error`` for a 401...), for every answer
under ``/v1`` that is not a success: the app's error handlers call :func:`error_response`.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable

from flask import Response

from tanglebox.generation import Done, FinishReason, TokenLogprob

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               408: "timeout_error", 409: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error"}
ERROR_CODES = {401: "invalid_api_key", 413: "request_too_large", 429: "rate_limit_exceeded"}
# OpenAI's reasons are stop and length; a reply stopped by requestTimeoutSeconds was cut at a
# server limit, which clients treat as they treat max_tokens.
FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length",
                  FinishReason.TIMEOUT: "length"}
STREAM_END = "data: [DONE]\n\n"


@dataclass(frozen=True)
class ReplyHead:
    """What every object of one reply repeats."""

    object: str  # "chat.completion", "chat.completion.chunk", "text_completion"
    model: str
    fingerprint: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if not self.id:
            prefix = "chatcmpl" if self.object.startswith("chat") else "cmpl"
            object.__setattr__(self, "id", f"{prefix}-{uuid.uuid4().hex}")

    def fields(self) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created,
                "model": self.model, "system_fingerprint": self.fingerprint}


class OpenAIError(Exception):
    """An answer in OpenAI's error shape: ``status``, the sentence, the parameter to change."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


def fingerprint(*parts: object) -> str:
    """``system_fingerprint``: changes when the model or how it is served changes."""
    digest = hashlib.sha256("|".join(str(part) for part in parts).encode()).hexdigest()
    return f"fp_{digest[:12]}"


def usage(done: Done) -> dict[str, Any]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": done.cached_tokens}}


def finish_reason(done: Done) -> str:
    return FINISH_REASONS.get(done.finish_reason, "stop")


# -- chat completions ------------------------------------------------------------------------

def chat_completion(head: ReplyHead, done: Done, logprobs: bool) -> dict[str, Any]:
    return {**head.fields(),
            "choices": [{"index": 0,
                         "message": {"role": "assistant", "content": done.text,
                                     "refusal": None},
                         "logprobs": chat_logprobs(done.logprobs) if logprobs else None,
                         "finish_reason": finish_reason(done)}],
            "usage": usage(done), "timings": done.timings}


def chat_chunk(head: ReplyHead, delta: dict[str, Any], finish: str | None = None,
               logprobs: Iterable[TokenLogprob] | None = None,
               with_usage: bool = False) -> dict[str, Any]:
    chunk = {**head.fields(),
             "choices": [{"index": 0, "delta": delta,
                          "logprobs": None if logprobs is None else chat_logprobs(logprobs),
                          "finish_reason": finish}]}
    if with_usage:
        chunk["usage"] = None  # the last chunk has it (stream_options.include_usage)
    return chunk


def chat_logprobs(entries: Iterable[TokenLogprob]) -> dict[str, Any]:
    return {"content": [{**_token(entry),
                         "top_logprobs": [_token(top) for top in entry.top]}
                        for entry in entries],
            "refusal": None}


def _token(entry: Any) -> dict[str, Any]:
    return {"token": entry.token, "logprob": entry.logprob, "bytes": list(entry.bytes)}


# -- completions -----------------------------------------------------------------------------

def text_completion(head: ReplyHead, text: str, finish: str | None,
                    logprobs: dict[str, Any] | None) -> dict[str, Any]:
    return {**head.fields(),
            "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                         "finish_reason": finish}]}


def legacy_logprobs(entries: Iterable[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """``/v1/completions``' older shape: parallel lists, each token's text offset."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for entry in entries:
        tokens.append(entry.token)
        token_logprobs.append(entry.logprob)
        tops.append({top.token: top.logprob for top in entry.top})
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops,
            "text_offset": offsets}


# -- the rest --------------------------------------------------------------------------------

def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param,
                      "code": code or ERROR_CODES.get(status)}}


def error_response(status: int, message: str, param: str | None = None,
                   code: str | None = None,
                   headers: Iterable[tuple[str, str]] = ()) -> Response:
    response = Response(json.dumps(error_body(status, message, param, code)), status=status,
                        mimetype="application/json")
    for name, value in headers:
        if name.lower() not in ("content-type", "content-length"):
            response.headers[name] = value
    return response

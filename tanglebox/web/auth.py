"""Who may use the API: whether it is served at all, and one way to read and check a token.

``enableApi: false`` answers 404 on every API surface (REST, the original socket's handshake)
through :func:`require_api_enabled`.

API tokens: one way to read a token and one way to check it, for every surface.

REST, the original websocket and any later API all call :func:`request_token` and
:func:`token_is_valid`, so there is no second path (an alternate header, a socket message)
that skips the check. Open WebUI once had exactly that bypass; SECURITY.md asks for one
function, tested per surface.

A token is read from ``Authorization: Bearer <token>``, else from the ``token`` parameter
(the original's way): the query string, a form field or a JSON body field. The token file is
:mod:`tanglebox.api_tokens`; it is re-read when it changes, so no restart is needed.
"""

from __future__ import annotations

from flask import abort, current_app, request
from werkzeug.datastructures import WWWAuthenticate
from werkzeug.exceptions import Unauthorized

from tanglebox.api_tokens import ApiTokens
from tanglebox.client_json import RequestError, decode_json
from tanglebox.runtime import current_runtime

# The same words for a missing, an empty and a wrong token: the answer must not tell an
# attacker which of them happened, and it never repeats the token.
UNAUTHORIZED_MESSAGE = ("token: a valid API token is required. Send it as "
                        "'Authorization: Bearer <token>' or as the 'token' parameter.")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def require_api_enabled() -> None:
    """404 when ``enableApi`` is off: the API is not there at all."""
    if not current_runtime().settings["enableApi"]:
        abort(404)


def request_token() -> str | None:
    """The token the client sent, or None: Bearer header first, then the ``token`` parameter."""
    scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    token = request.args.get("token")
    if token is None and request.mimetype in FORM_TYPES:
        token = request.form.get("token")
    if token is None and request.is_json:
        token = _json_body_token()
    return token if isinstance(token, str) else None


def token_is_valid(token: str | None) -> bool:
    """True when tokens are not required, or ``token`` is in the token file."""
    settings = current_runtime().settings
    if not settings["isApiTokensRequired"]:
        return True
    return api_tokens().is_valid(token)


def require_token() -> None:
    """Raise 401 (with ``WWW-Authenticate: Bearer``) unless the request carries a valid token."""
    if not token_is_valid(request_token()):
        raise Unauthorized(UNAUTHORIZED_MESSAGE,
                           www_authenticate=WWWAuthenticate("bearer", {"realm": "tanglebox"}))


def api_tokens() -> ApiTokens:
    # One per app (not a module global), so tests can run several apps in one process.
    tokens = current_app.extensions.get("tanglebox.api_tokens")
    if tokens is None:
        settings = current_runtime().settings
        tokens = ApiTokens(settings.relative_path(settings["apiTokensFile"]))
        current_app.extensions["tanglebox.api_tokens"] = tokens
    return tokens


def _json_body_token() -> object:
    # Not request.get_json(): it lets RecursionError (deeply nested JSON) escape as a 500, and
    # it lets a lone surrogate through to the hash. A body refused here is refused by its
    # route too (a 400 naming what is wrong).
    try:
        body = decode_json(request.get_data(cache=True), "body", "a JSON object")
    except RequestError:
        return None
    return body.get("token") if isinstance(body, dict) else None

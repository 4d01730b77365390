"""Rules every route gets: Host check, Origin check, security headers.

- Host (DNS rebinding, as Ollama's CVE-2024-28224): only localhost names, the configured
  ``host`` and ``allowedHosts`` are served; anything else is a 403.
- Origin (cross-site websocket hijacking, cross-site form posts): browsers always send Origin
  on websocket handshakes and cross-site POSTs. A request whose Origin is neither this server
  nor in ``allowedOrigins`` is refused before any work, before a socket upgrade. Scripts send no
  Origin and are served (API tokens guard them).
- Headers: a strict Content-Security-Policy, nosniff, no referrer; ``frame-ancestors 'none'``
  except where a view opens it (the widget) with :func:`allow_framing`.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask, Response, abort, g, request

from tanglebox.runtime import current_runtime

LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def init_app(app: Flask) -> None:
    app.before_request(_check_host_and_origin)
    app.after_request(_add_security_headers)


def is_websocket_handshake() -> bool:
    return request.headers.get("Upgrade", "").lower() == "websocket"


def origin_listed(origin: str | None) -> bool:
    """True when ``origin`` is one of ``allowedOrigins`` (the one rule: case and a trailing
    slash do not matter); also the rule for CORS."""
    if not origin:
        return False
    allowed = {o.lower().rstrip("/") for o in current_runtime().settings["allowedOrigins"]}
    return origin.lower().rstrip("/") in allowed


def origin_allowed(origin: str | None) -> bool:
    """True for no Origin (not a browser), this server's own origin, or a configured one."""
    if origin is None:
        return True
    own = f"{request.scheme}://{request.host}".lower()
    origin = origin.lower().rstrip("/")
    if origin == own or origin_listed(origin):
        return True
    # Behind a TLS-terminating proxy the scheme we see may differ; the host must still match.
    return urlsplit(origin).netloc == request.host.lower() and urlsplit(origin).scheme in (
        "http", "https")


def allow_framing(origins: list[str]) -> None:
    """Let this response be framed by ``origins`` (the widget); never by everyone."""
    g.frame_ancestors = " ".join(origins) if origins else "'none'"


def _host_allowed(host: str) -> bool:
    settings = current_runtime().settings
    allowed = set(settings["allowedHosts"])
    if "*" in allowed:
        return True
    name = urlsplit(f"//{host}").hostname or ""
    configured = settings["host"]
    return (name in LOCAL_HOSTS or name in allowed
            or (configured not in ("0.0.0.0", "::") and name == configured))


def _check_host_and_origin() -> None:
    if not _host_allowed(request.host):
        abort(403, description="This server does not answer to that Host name; add it to "
                               "\"allowedHosts\" in settings.json.")
    if (is_websocket_handshake() or request.method in UNSAFE_METHODS) and not origin_allowed(
            request.headers.get("Origin")):
        abort(403, description="Requests from this Origin are not allowed; add it to "
                               "\"allowedOrigins\" in settings.json.")


def _add_security_headers(response: Response) -> Response:
    frame_ancestors = g.get("frame_ancestors", "'none'")
    response.headers.setdefault("Content-Security-Policy", "; ".join((
        "default-src 'self'", "script-src 'self'", "style-src 'self'",
        "img-src 'self' data:", "connect-src 'self'", "object-src 'none'",
        "base-uri 'none'", "form-action 'self'", f"frame-ancestors {frame_ancestors}")))
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    # Not no-referrer: under it a browser's form POST carries "Origin: null" (Fetch's request
    # origin serialization), which the Origin check refuses (the sign-in form). same-origin
    # still sends nothing to other sites.
    response.headers.setdefault("Referrer-Policy", "same-origin")
    if frame_ancestors == "'none'":
        response.headers.setdefault("X-Frame-Options", "DENY")
    return response

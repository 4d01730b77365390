"""Which other web pages may call the HTTP APIs (REST ``/conversation`` and the OpenAI API).

One rule, ``allowedOrigins``: a page of a listed origin gets CORS headers (never ``*``, never
credentials) and its preflights answered; a page of any other origin is refused with 403
before any work (:func:`refuse_cross_site_browsers`). Scripts send no Origin and are served;
API tokens guard them.
"""

from __future__ import annotations

from flask import Response, abort, request

from tanglebox.web.security import origin_allowed, origin_listed


def add_cors_headers(response: Response) -> Response:
    """CORS only for origins in ``allowedOrigins``: never ``*``, never credentials."""
    response.vary.add("Origin")
    origin = request.headers.get("Origin")
    if origin_listed(origin):
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = "Retry-After, WWW-Authenticate"
    return response


def refuse_cross_site_browsers() -> None:
    """403 for a request a page of another origin made a browser send, unless that origin is
    in ``allowedOrigins``; the rule for every method (``POST`` also meets the app-wide Origin
    check).

    A ``GET`` made by an ``<img src=…/conversation?userPrompt=…>`` or a link carries no Origin,
    so browsers' ``Sec-Fetch-Site`` tells: ``cross-site`` (another site) and ``same-site``
    (the same host on another port or scheme, e.g. another local server's page on 127.0.0.1)
    are refused; ``same-origin`` and ``none`` (typed in the address bar) are served. A browser
    without Sec-Fetch-Site still sends Origin on a ``fetch`` from another origin. Scripts send
    neither header and are served as before (tokens guard them).
    """
    origin = request.headers.get("Origin")
    if origin_listed(origin):
        return
    if (request.headers.get("Sec-Fetch-Site") in ("cross-site", "same-site")
            or not origin_allowed(origin)):
        abort(403, description="Origin: requests made by pages of another origin are "
                               "not allowed; add its origin to \"allowedOrigins\" in "
                               "settings.json.")


def options_response(methods: str) -> Response:
    """Answer a CORS preflight for allowed origins; anyone else learns only ``Allow``."""
    response = Response(status=204, headers={"Allow": methods})
    del response.headers["Content-Type"]  # no body
    if origin_listed(request.headers.get("Origin")) and request.headers.get(
            "Access-Control-Request-Method"):
        response.headers["Access-Control-Allow-Methods"] = methods
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type, Accept"
        response.headers["Access-Control-Max-Age"] = "600"
    return response

"""Who a person is, without accounts: a long-lived random cookie per browser.

The chat UI's conversations belong to a browser (``StoredConversation.owner``). The browser
holds a random cookie; the owner stored is the SHA-256 hex of its value, so the database (and
anything that reads it) never holds a value that would let someone act as that browser.

    first page load (no cookie, or one not made here) ──► a new random value, set by an
        after_request hook; browser_id() in the same request already answers with it
    every later request ──► browser_id() = sha256(cookie value)
    every page load ──► the cookie is set again, so it lives 400 days past the last visit

Two cookies, because the page and the widget live in different places:

- ``tanglebox_browser`` (the page): HttpOnly, SameSite=Lax (a link from elsewhere still opens
  the person's own ``/c/<id>``; a cross-site POST does not carry it, and the Origin check
  refuses those anyway), Secure under ``useSsl``.
- ``tanglebox_widget`` (the widget, framed by other sites): a framed page gets no SameSite
  cookie, so it is ``Partitioned; SameSite=None; Secure`` (CHIPS): the browser keeps it per
  top-level site, so each embedding site has its own, and one site never sees another's. A
  Secure cookie needs a secure context (https, or localhost in Chromium); elsewhere no cookie
  is set and the widget starts a new conversation on every page view, as before. The
  conversation's ``site`` is the embedding origin (:func:`embedding_site`).

The cookie's value is never logged, rendered or sent anywhere but in this Set-Cookie.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from datetime import timedelta
from urllib.parse import urlsplit

from flask import Flask, Response, g, request

from tanglebox.runtime import current_runtime
from tanglebox.web.security import LOCAL_HOSTS, is_websocket_handshake

PAGE_COOKIE = "tanglebox_browser"
WIDGET_COOKIE = "tanglebox_widget"
# Chromium caps a cookie's lifetime at 400 days (RFC 6265bis); asking for more is cut anyway.
COOKIE_LIFETIME = timedelta(days=400)
# secrets.token_urlsafe(32): 43 characters. Anything else (short, tampered) is not ours.
COOKIE_VALUE = re.compile(r"^[A-Za-z0-9_-]{43}$")
PAGE, WIDGET = "page", "widget"


def init_app(app: Flask) -> None:
    app.after_request(_remember_browser)


def request_surface() -> str:
    """The surface this request serves: the widget (``/widget``, or ``?surface=widget`` on the
    socket and the history routes) or the page."""
    if request.path == "/widget" or request.args.get("surface") == WIDGET:
        return WIDGET
    return PAGE


def browser_id(surface: str | None = None) -> str:
    """This browser's id for ``surface`` (default: the request's): the SHA-256 hex of its
    cookie, or of a new value that this response sets."""
    surface = surface or request_surface()
    value = _cookie_value(surface)
    if value is None:
        minted = g.setdefault("tanglebox_new_browser_cookies", {})
        value = minted.setdefault(surface, secrets.token_urlsafe(32))
    return hashlib.sha256(value.encode("ascii")).hexdigest()


def widget_keeps_cookie() -> bool:
    """True when the widget's partitioned cookie can be kept: a Secure cookie needs a secure
    context (https, or a loopback host, which Chromium treats as one)."""
    host = request.host.rsplit(":", 1)[0].strip("[]").lower()
    return request.is_secure or current_runtime().settings["useSsl"] or host in LOCAL_HOSTS


def embedding_site(candidate: str | None = None) -> str:
    """The origin of the site that frames the widget, when it is one of
    ``widgetAllowedOrigins``: ``candidate`` (the widget's socket passes on the page's
    ``?site=``), else the ``Referer``'s origin (the widget page's own request); "" otherwise.
    Only a label that keeps each site's conversations apart in the list; the partitioned
    cookie is what keeps them apart in the browser."""
    if candidate is None:
        referer = urlsplit(request.headers.get("Referer", ""))
        candidate = f"{referer.scheme}://{referer.netloc}" if referer.netloc else ""
    allowed = {o.lower().rstrip("/") for o in current_runtime().settings["widgetAllowedOrigins"]}
    site = candidate.lower().rstrip("/")
    return site if site in allowed else ""


def _cookie_value(surface: str) -> str | None:
    minted = g.get("tanglebox_new_browser_cookies", {})
    if surface in minted:
        return minted[surface]
    value = request.cookies.get(WIDGET_COOKIE if surface == WIDGET else PAGE_COOKIE)
    return value if value is not None and COOKIE_VALUE.match(value) else None


def _remember_browser(response: Response) -> Response:
    """Set the cookie when this request made a new id, and again on every page load (HTML),
    so it outlives 400 days of use. Never on a socket handshake (no headers go back)."""
    if is_websocket_handshake():
        return response
    surface = request_surface()
    page_load = request.method == "GET" and response.mimetype == "text/html"
    if not page_load and surface not in g.get("tanglebox_new_browser_cookies", {}):
        return response
    value = _cookie_value(surface) or g.setdefault(
        "tanglebox_new_browser_cookies", {}).setdefault(surface, secrets.token_urlsafe(32))
    if surface == WIDGET:
        if widget_keeps_cookie():
            response.set_cookie(WIDGET_COOKIE, value, max_age=COOKIE_LIFETIME, httponly=True,
                                secure=True, samesite="None", partitioned=True)
    else:
        response.set_cookie(PAGE_COOKIE, value, max_age=COOKIE_LIFETIME, httponly=True,
                            secure=bool(current_runtime().settings["useSsl"]), samesite="Lax")
    response.vary.add("Cookie")
    return response

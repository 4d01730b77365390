"""A browser's identity: the long-lived random cookie, its flags, and the id derived from it."""

from __future__ import annotations

import hashlib
import re

import pytest

from tanglebox.runtime import Runtime
from tanglebox.settings import load_settings
from tanglebox.web import create_app

from tanglebox.web.browser_identity import COOKIE_VALUE, PAGE_COOKIE, WIDGET_COOKIE, browser_id
from tests.conftest import write_settings

FOUR_HUNDRED_DAYS = 400 * 24 * 3600


@pytest.fixture
def settings_values():
    return {"widgetAllowedOrigins": ["https://shop.example"], "allowedHosts": ["chat.example"]}


def set_cookie_header(response, name: str) -> str:
    headers = [h for h in response.headers.getlist("Set-Cookie") if h.startswith(name + "=")]
    assert len(headers) == 1, response.headers.getlist("Set-Cookie")
    return headers[0]


def cookie_value(header: str) -> str:
    return header.split(";", 1)[0].split("=", 1)[1]


def test_the_first_page_load_sets_a_long_lived_http_only_lax_cookie(client):
    header = set_cookie_header(client.get("/"), PAGE_COOKIE)
    value = cookie_value(header)
    assert COOKIE_VALUE.match(value)
    assert "HttpOnly" in header and "SameSite=Lax" in header and "Path=/" in header
    assert f"Max-Age={FOUR_HUNDRED_DAYS}" in header
    assert "Secure" not in header  # plain http here: a Secure cookie would never come back


def test_the_id_is_the_sha256_of_the_cookie_and_stays_across_requests(app, client):
    value = cookie_value(set_cookie_header(client.get("/"), PAGE_COOKIE))
    again = client.get("/")
    # Set again on every page load (so it outlives 400 days of use), with the same value.
    assert cookie_value(set_cookie_header(again, PAGE_COOKIE)) == value
    with app.test_request_context("/", headers={"Cookie": f"{PAGE_COOKIE}={value}"}):
        assert browser_id() == hashlib.sha256(value.encode()).hexdigest()
        assert value not in browser_id()


@pytest.mark.parametrize("bad", ["short", "x" * 42 + "!", "x" * 44, ""])
def test_a_tampered_or_short_cookie_gets_a_new_id(app, client, bad):
    client.set_cookie(PAGE_COOKIE, bad)
    value = cookie_value(set_cookie_header(client.get("/"), PAGE_COOKIE))
    assert value != bad and COOKIE_VALUE.match(value)
    with app.test_request_context("/", headers={"Cookie": f"{PAGE_COOKIE}={bad}"}):
        first = browser_id()
        assert first != hashlib.sha256(bad.encode()).hexdigest()
        assert browser_id() == first  # one new id per request, not one per call


def test_two_browsers_get_different_ids(app):
    first, second = app.test_client(), app.test_client()
    one = cookie_value(set_cookie_header(first.get("/"), PAGE_COOKIE))
    two = cookie_value(set_cookie_header(second.get("/"), PAGE_COOKIE))
    assert one != two


def test_the_widget_on_a_secure_context_gets_a_partitioned_same_site_none_cookie(client):
    response = client.get("/widget")
    header = set_cookie_header(response, WIDGET_COOKIE)
    for flag in ("Secure", "HttpOnly", "SameSite=None", "Partitioned"):
        assert flag in header
    assert not [h for h in response.headers.getlist("Set-Cookie") if h.startswith(PAGE_COOKIE)]


def test_the_widget_over_plain_http_on_another_host_sets_no_cookie(client):
    # A Secure cookie would be dropped there: the widget starts afresh per page view.
    response = client.get("/widget", headers={"Host": "chat.example"})
    assert response.status_code == 200
    assert not re.search(WIDGET_COOKIE, " ".join(response.headers.getlist("Set-Cookie")))


def test_the_page_cookie_is_secure_under_use_ssl(tmp_path):
    settings = load_settings(write_settings(tmp_path, useSsl=True, sslCertFile="cert.pem",
                                            sslKeyFile="key.pem"))
    app = create_app(settings, Runtime(settings))  # no model: the page renders without one
    response = app.test_client().get("/", base_url="https://localhost")
    header = set_cookie_header(response, PAGE_COOKIE)
    assert "Secure" in header and "HttpOnly" in header and "SameSite=Lax" in header


def test_no_cookie_on_a_plain_json_request(client):
    assert client.get("/health").headers.getlist("Set-Cookie") == []

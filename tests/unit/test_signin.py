"""The chat UI behind API tokens: sign in with a token, get a session cookie, sign out.

The UI socket's handshake with and without the cookie is tested against a live server in
tests/integration/test_signin_live.py.
"""

from __future__ import annotations

import pytest

from tanglebox.api_tokens import add_token, revoke_token

TOKENS = "tokens.txt"


@pytest.fixture
def settings_values():
    return {"isApiTokensRequired": True, "apiTokensFile": TOKENS}


@pytest.fixture
def token(tmp_path):
    return add_token(tmp_path / TOKENS, "alice")


def sign_in(client, token, next_path="/"):
    return client.post("/signin", data={"token": token, "next": next_path})


def test_the_chat_page_sends_a_browser_without_a_session_to_the_sign_in_page(client):
    response = client.get("/")
    assert response.status_code == 303
    assert response.headers["Location"] == "/signin?next=%2F"
    form = client.get("/signin?next=/")
    assert form.status_code == 200
    assert b'name="token" type="password"' in form.data and b'value="/"' in form.data


def test_a_valid_token_sets_a_strict_http_only_session_cookie_and_opens_the_chat(client, token):
    response = sign_in(client, token)
    assert response.status_code == 303 and response.headers["Location"] == "/"
    cookie = response.headers["Set-Cookie"]
    assert cookie.startswith("tanglebox_session=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Secure" not in cookie
    assert token not in cookie  # the cookie holds a digest of the token, never the token
    page = client.get("/")
    assert page.status_code == 200 and b"ws-connect" in page.data
    assert b'action="/signout"' in page.data


@pytest.mark.parametrize("presented", ["", "   ", "tbx_wrong", "TOKEN"])
def test_a_wrong_token_is_refused_with_the_form_again_and_no_session(client, token, presented):
    response = sign_in(client, presented)
    assert response.status_code == 401
    assert b"That token is not valid" in response.data
    assert "Set-Cookie" not in response.headers
    assert client.get("/").status_code == 303


def test_revoking_the_token_signs_its_browsers_out(client, token, tmp_path):
    sign_in(client, token)
    assert client.get("/").status_code == 200
    revoke_token(tmp_path / TOKENS, "alice")
    assert client.get("/").status_code == 303


def test_sign_out_forgets_the_session(client, token):
    sign_in(client, token)
    response = client.post("/signout")
    assert response.status_code == 303 and response.headers["Location"] == "/signin"
    assert client.get("/").status_code == 303


def test_after_sign_in_only_the_chat_pages_are_destinations(client, token):
    for wanted in ("https://evil.example/", "//evil.example", "/conversation"):
        response = sign_in(client, token, wanted)
        assert response.headers["Location"] == "/"
    assert sign_in(client, token, "/widget").headers["Location"] == "/widget"


def test_the_widget_needs_a_session_unless_widget_open(client, app, token):
    assert client.get("/widget").status_code == 303
    app.extensions["tanglebox"].settings.values["widgetOpen"] = True
    assert client.get("/widget").status_code == 200
    assert client.get("/").status_code == 303  # the page still asks


@pytest.mark.parametrize("settings_values", [
    {"isApiTokensRequired": True, "apiTokensFile": TOKENS, "uiRequiresToken": "no"},
    {"isApiTokensRequired": False, "apiTokensFile": TOKENS},
])
def test_the_chat_is_open_when_the_ui_does_not_ask_for_a_token(client):
    assert client.get("/").status_code == 200
    assert client.get("/widget").status_code == 200


@pytest.mark.parametrize("settings_values", [
    {"isApiTokensRequired": False, "apiTokensFile": TOKENS, "uiRequiresToken": "yes"},
])
def test_the_ui_can_ask_for_a_token_while_the_api_does_not(client, token):
    assert client.get("/").status_code == 303
    sign_in(client, token)
    assert client.get("/").status_code == 200


def test_a_sign_in_from_another_origin_is_refused(client, token):
    response = client.post("/signin", data={"token": token},
                           headers={"Origin": "https://evil.example"})
    assert response.status_code == 403
    assert "Set-Cookie" not in response.headers


@pytest.mark.parametrize("next_path, lands", [
    ("/widget", "/widget"),
    ("/c/abcdefghijklmnop_-12", "/c/abcdefghijklmnop_-12"),  # a stored conversation's link
    ("https://evil.example/", "/"),
    ("//evil.example/c/abcdefghijklmnop", "/"),
    ("/c/abcdefghijklmnop\n", "/"),
    ("/c/short", "/"),
    ("/c/abcdefghijklmnop/../../x", "/"),
])
def test_signing_in_returns_only_to_a_page_of_this_server(client, token, next_path, lands):
    response = sign_in(client, token, next_path)
    assert response.status_code == 303 and response.headers["Location"] == lands

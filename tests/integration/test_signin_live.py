"""The UI socket behind a sign-in: no session, no chat (refused before the upgrade), on a live
server with a real websocket client; with the session cookie from /signin it chats."""

from __future__ import annotations

import pytest
import requests
import websocket

from tanglebox.api_tokens import add_token


@pytest.fixture
def server_and_token(fake_server, tmp_path):
    token = add_token(tmp_path / "tokens.txt", "alice")
    fake_server.start(fake={}, isApiTokensRequired=True, apiTokensFile="tokens.txt")
    return fake_server, token


def test_the_ui_socket_refuses_a_client_without_a_session_before_the_upgrade(server_and_token):
    server, token = server_and_token
    for query in ("", "?surface=widget", f"?token={token}"):
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(f"{server.ws_url}/ws/chat{query}", timeout=10)
        assert refused.value.status_code == 401


def test_a_signed_in_browser_chats_over_the_ui_socket(server_and_token):
    server, token = server_and_token
    browser = requests.Session()
    signed = browser.post(server.url + "/signin", data={"token": token}, allow_redirects=False)
    assert signed.status_code == 303
    cookie = "; ".join(f"{c.name}={c.value}" for c in browser.cookies)
    ws = websocket.create_connection(f"{server.ws_url}/ws/chat", timeout=10,
                                     header=[f"Cookie: {cookie}"])
    try:
        assert 'id="composer"' in ws.recv()
        ws.send('{"userPrompt": "echo signed in"}')
        replies = []
        while not any("signed in" in r and 'aria-busy' not in r for r in replies[-1:]):
            replies.append(ws.recv())
        assert any("signed in" in r for r in replies)
    finally:
        ws.close()

"""Signing in to the chat with an API token, in real Chromium: a wrong token shows the form
again with the reason, a right one opens the chat, and the chat works over its socket."""

from __future__ import annotations

import pytest

from tanglebox.api_tokens import add_token
from tests.live_server import LiveServer

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright Python package is not installed")
expect = sync_api.expect


@pytest.fixture
def server(tmp_path):
    token = add_token(tmp_path / "tokens.txt", "alice")
    server = LiveServer(tmp_path).start(fake={}, isApiTokensRequired=True,
                                        apiTokensFile="tokens.txt")
    yield server, token
    server.stop()


def test_signing_in_with_a_token_opens_the_chat(server, open_page):
    live, token = server
    # The wrong token's answer is a 401, which Chromium reports in the console.
    page = open_page(live.url + "/", expected_errors=(
        "Failed to load resource: the server responded with a status of 401 (UNAUTHORIZED)",))
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    page.get_by_label("API token").fill("tbx_not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("That token is not valid")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected",
                                                                 timeout=15_000)
    prompt = page.locator("#prompt")
    prompt.fill("echo signed in and chatting")
    prompt.press("Enter")
    expect(page.locator("#turn-1-reply .message__content")).to_have_text(
        "signed in and chatting", timeout=30_000)
    page.locator("summary", has_text="Settings").click()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()

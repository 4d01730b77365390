"""Regenerate and edit in Chromium: the old reply (or message) stays as an alternative, and the
"‹ 2/2 ›" beside it flips between them (its buttons work: htmx processes them, while the
messages themselves stay hx-disable)."""

from __future__ import annotations

import pytest

from tests.live_server import LiveServer

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright (requirements-dev.txt) drives the browser")
expect = sync_api.expect

from tests.browser.test_chat_ui import connected, finished_reply, send  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("alternatives"))
    server.start(fake={"step_delay": 0.005})
    yield server
    server.stop()


def test_regenerate_then_flip_back_and_edit_the_last_message(open_page, server):
    page = connected(open_page(server.url))
    send(page, "echo first answer")
    finished_reply(page)
    page.get_by_role("button", name="Regenerate").click()
    flipper = page.get_by_role("form", name="Other versions of this reply")
    expect(flipper.locator(".flipper__count")).to_have_text("2/2")
    flipper.get_by_role("button", name="Previous reply").click()
    expect(flipper.locator(".flipper__count")).to_have_text("1/2")
    expect(flipper.get_by_role("button", name="Previous reply")).to_be_disabled()

    page.locator(".turn__edit summary").click()
    page.get_by_label("Edited message").fill("echo second thought")
    page.locator(".turn__edit").get_by_role("button", name="Send").click()
    expect(finished_reply(page).locator(".message__content")).to_have_text("second thought")
    messages = page.get_by_role("form", name="Other versions of this message")
    expect(messages.locator(".flipper__count")).to_have_text("2/2")
    messages.get_by_role("button", name="Previous message").click()
    expect(page.locator("#turn-1-reply .message__content")).to_have_text("first answer")

"""Under each reply in headless Chromium, against a live server on the fake backend with a
small context (issue 18): Copy puts the reply's Markdown source on the clipboard, "Show
prompt" shows the text the template made, the context meter appears and grows each turn, and
a message too long for the context offers the choice to continue without the oldest turns.

Screenshots (desktop light, phone) go to a temporary folder, or to
``TANGLEBOX_SCREENSHOTS_DIR``.
"""

from __future__ import annotations

import re

import pytest

from tests.live_server import LiveServer

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright Python package is not installed")
expect = sync_api.expect
expect.set_options(timeout=15_000)  # a bound for failing on a busy CI machine, not a speed goal

from tests.browser.conftest import PHONE  # noqa: E402
from tests.browser.test_history_ui import screenshots  # noqa: E402,F401 - the fixture

CONTEXT = 160  # fake tokens: one per character, so three short turns fill most of it
REPLY_DEADLINE_MS = 30_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("reply-info"))
    server.start(fake={"step_delay": 0.002, "context_length": CONTEXT})
    yield server
    server.stop()


def ask(page, turn: int, text: str) -> None:
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")
    meta = page.locator(f"#turn-{turn}-meta")
    expect(meta.get_by_role("button", name="Copy reply as Markdown")).to_be_visible(
        timeout=REPLY_DEADLINE_MS)


def meter_tokens(page) -> int:
    text = page.locator("#context-meter").inner_text()
    found = re.search(rf"(\d+) / {CONTEXT} tokens", text)
    assert found, text
    return int(found.group(1))


def test_copy_show_prompt_and_the_meter(open_page, server, screenshots):
    page = open_page(server.url + "/")
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
    expect(page.locator("#context-meter")).to_have_count(0)  # nothing counted yet
    ask(page, 1, "echo **bold** text")
    meta = page.locator("#turn-1-meta")
    expect(meta).to_contain_text("ms to first token")
    meta.get_by_role("button", name="Copy reply as Markdown").click()
    expect(meta.get_by_role("button", name="Copy reply as Markdown")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "**bold** text"

    meta.locator("summary", has_text="Show prompt").click()
    prompt = meta.locator(".reply-prompt__text")
    expect(prompt).to_contain_text("<|user|>echo **bold** text<|end|><|assistant|>")
    expect(meta.locator(".reply-prompt__head")).to_contain_text("tokens")

    first = meter_tokens(page)
    ask(page, 2, "echo more")
    expect(page.locator("#context-meter")).not_to_contain_text(f"{first} / {CONTEXT}")
    assert meter_tokens(page) > first
    page.screenshot(path=str(screenshots / "reply-info-desktop.png"), caret="initial")


def test_too_long_continues_without_the_oldest_turns(open_page, server, screenshots):
    page = open_page(server.url + "/", viewport=PHONE)
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
    ask(page, 1, "echo " + "a" * 30)
    ask(page, 2, "echo " + "b" * 30)
    page.locator("#prompt").fill("echo " + "c" * 50)
    page.locator("#prompt").press("Enter")
    error = page.locator("#chat-error")
    expect(error).to_contain_text("context")
    page.screenshot(path=str(screenshots / "reply-info-too-long-phone.png"), caret="initial")
    error.get_by_role("button", name="Continue without the oldest messages").click()
    expect(page.locator(".context-divider")).to_have_text(
        "Earlier messages are not sent to the model")
    reply = page.locator("#turn-3-reply")
    expect(reply).to_contain_text("ccc", timeout=REPLY_DEADLINE_MS)
    expect(page.locator("#chat-error")).to_be_hidden()
    page.screenshot(path=str(screenshots / "reply-info-phone.png"), caret="initial")

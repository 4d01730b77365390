"""The model picker in real headless Chromium: with two models served (and one down) the
settings panel offers them, the keyboard chooses one, and the choice writes the replies that
follow. A live server on the fake backend, with a second fake model beside it
(``tests.extra_models``) that answers WHO in its own words.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.live_server import LiveServer

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright Python package is not installed")
expect = sync_api.expect
expect.set_options(timeout=15_000)  # a bound for failing on a busy CI machine, not a speed goal

from tests.browser.test_chat_ui import connected, finished_reply, send  # noqa: E402

WHO = "Who are you?"
DEFAULT = "SmolLM2-135M-Instruct"  # the default settings' model id
SECOND, GONE = "second-model", "gone-model"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("model-picker"))
    server.start(fake={"step_delay": 0.01, "replies": {WHO: "I am the first model."},
                       "extra_models": {SECOND: {"step_delay": 0.01,
                                                 "replies": {WHO: "I am the second model."}}},
                       "unavailable_models": [GONE]})
    yield server
    server.stop()


def test_the_keyboard_chooses_a_model_and_it_writes_the_next_replies(open_page, server,
                                                                     tmp_path):
    page = connected(open_page(server.url))
    page.get_by_text("Settings", exact=True).click()
    picker = page.get_by_label("Model")
    expect(picker).to_be_visible()
    expect(picker).to_have_value(DEFAULT)
    expect(picker.locator("option")).to_have_text(
        [f"{DEFAULT} (default)", SECOND, f"{GONE} (unavailable)"])
    expect(picker.locator("option[disabled]")).to_have_text([f"{GONE} (unavailable)"])

    picker.focus()
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")  # the model that is down cannot be chosen
    expect(picker).to_have_value(SECOND)
    folder = Path(os.environ.get("TANGLEBOX_SCREENSHOTS_DIR") or tmp_path)
    page.screenshot(path=str(folder / "model-picker.png"), caret="initial")
    page.get_by_role("button", name="Apply").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#settings-status")).to_have_text("Applied to this conversation.")
    expect(page.locator("#model-chip")).to_contain_text(SECOND)  # the header names it
    expect(page.locator("#prompt")).to_have_attribute("placeholder", f"Message {SECOND}")
    page.keyboard.press("Escape")

    send(page, WHO)
    expect(finished_reply(page).locator(".message__content")).to_have_text(
        "I am the second model.")
    send(page, WHO)  # the choice sticks: the next reply too, and the panel still shows it
    expect(finished_reply(page, turn=2).locator(".message__content")).to_have_text(
        "I am the second model.")
    page.get_by_text("Settings", exact=True).click()
    expect(page.get_by_label("Model")).to_have_value(SECOND)
    page.screenshot(path=str(folder / "model-picker-chosen.png"), caret="initial")


def test_a_new_page_starts_with_the_default_model(open_page, server):
    page = connected(open_page(server.url))
    send(page, WHO)
    expect(finished_reply(page).locator(".message__content")).to_have_text(
        "I am the first model.")
    expect(page.locator("#model-chip")).to_contain_text("fake-model")  # the local backend's name

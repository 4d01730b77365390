"""The chat page's history in headless Chromium against a live server on the fake backend:
the sidebar lists a chat once it has a reply and the URL becomes ``/c/<id>``, reloading
``/c/<id>`` shows it, two browsers (two contexts: two cookie jars) never see each other's,
rename, delete and undo, search, the drawer at phone width, and the widget's conversation
kept per embedding site.

Screenshots (desktop and phone, sidebar and drawer) go to a temporary folder, or to
``TANGLEBOX_SCREENSHOTS_DIR`` (``=docs`` refreshes the README's).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from tests.browser.test_chat_ui import StaticSite
from tests.live_server import LiveServer

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright Python package is not installed")
expect = sync_api.expect
expect.set_options(timeout=15_000)  # a bound for failing on a busy CI machine, not a speed goal

from tests.browser.conftest import DESKTOP, PHONE  # noqa: E402

NOT_FOUND = ("Failed to load resource: the server responded with a status of 404 (NOT FOUND)",)
REPLY_DEADLINE_MS = 30_000  # a bound for failing, not a speed requirement
CONVERSATION_PATH = re.compile(r".*/c/[A-Za-z0-9_-]{16,64}$")
RECIPE = [
    {"role": "user", "content": "How long should sourdough proof?"},
    {"role": "assistant", "content": "About **4 to 6 hours** at room temperature, or:\n\n"
                                     "1. overnight in the fridge,\n2. then 1 hour out."},
    {"role": "user", "content": "And the oven?"},
    {"role": "assistant", "content": "Preheat to `250 °C` with the pot inside."},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("history"))
    server.start(fake={"step_delay": 0.005})
    yield server
    server.stop()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    folder = os.environ.get("TANGLEBOX_SCREENSHOTS_DIR")
    return Path(folder) if folder else tmp_path_factory.mktemp("screenshots")


def imported(page, server, title: str, messages: list[dict]) -> str:
    """A conversation of this page's browser (its cookie jar), made through /import; its path."""
    page.goto(server.url + "/")  # the first page load sets the browser's cookie
    document = json.dumps({"title": title, "messages": messages}).encode()
    response = page.context.request.post(
        server.url + "/import", max_redirects=0,
        multipart={"file": {"name": "chat.json", "mimeType": "application/json",
                            "buffer": document}})
    assert response.status == 303, response.text()
    return response.headers["location"]


def chat_once(chat, text: str) -> None:
    """Send ``echo <text>`` in ``chat`` (a page, or the widget's frame); wait for the reply."""
    expect(chat.locator("#connection-state")).to_have_attribute("data-state", "connected")
    chat.locator("#prompt").fill("echo " + text)
    chat.locator("#prompt").press("Enter")
    reply = chat.locator("#turn-1-reply")
    expect(reply).to_contain_text(text, timeout=REPLY_DEADLINE_MS)
    expect(reply.locator("[aria-busy=true]")).to_have_count(0, timeout=REPLY_DEADLINE_MS)


def history_titles(page) -> list[str]:
    return page.locator("#history-list .history__link").all_inner_texts()


def test_reloading_a_conversations_url_shows_it_with_the_sidebar(open_page, server):
    page = open_page(server.url)
    path = imported(page, server, "Sourdough", RECIPE)
    page.goto(server.url + path)
    expect(page.locator(".turn")).to_have_count(2)
    expect(page.locator("#messages")).to_contain_text("4 to 6 hours")
    expect(page.locator("#messages .message__content strong")).to_have_text("4 to 6 hours")
    current = page.locator("#history-list [aria-current=page]")
    expect(current).to_have_text("Sourdough")
    page.reload()
    expect(page.locator("#messages")).to_contain_text("Preheat to")


def test_two_browsers_never_see_each_others_conversations(open_page, server):
    alice = open_page(server.url)
    path = imported(alice, server, "Alice's plans", RECIPE[:2])
    bob = open_page(server.url, expected_errors=NOT_FOUND)  # another context: another cookie jar
    expect(bob.locator("#history-list")).to_contain_text("Your conversations will appear here")
    assert "Alice's plans" not in history_titles(bob)
    bob.goto(server.url + path)
    expect(bob.get_by_role("heading", name="This conversation is not here")).to_be_visible()
    assert "sourdough" not in bob.content()
    bob.get_by_role("link", name="Start a new chat").click()
    expect(bob).to_have_url(server.url + "/")
    alice.goto(server.url + path)
    expect(alice.locator("#history-list [aria-current=page]")).to_have_text("Alice's plans")
    assert "How long should sourdough proof?" in alice.context.request.get(
        server.url + path).text()


def test_search_rename_delete_and_undo_in_the_sidebar(open_page, server, screenshots):
    page = open_page(server.url, expected_errors=NOT_FOUND)
    first = imported(page, server, "Sourdough", RECIPE)
    imported(page, server, "Train to Lisbon", [
        {"role": "user", "content": "Is there a night train to Lisbon?"},
        {"role": "assistant", "content": "Not any more; fly, or change in Madrid."}])
    page.goto(server.url + first)
    expect(page.locator("#history-list .history__link")).to_have_count(2)
    assert history_titles(page)[0] == "Train to Lisbon"  # newest first

    page.locator("#history-search").fill("madrid")  # a reply's text
    expect(page.locator("#history-list .history__link")).to_have_text(["Train to Lisbon"])
    page.locator("#history-search").fill("")
    expect(page.locator("#history-list .history__link")).to_have_count(2)

    row = page.locator(".history__item", has_text="Sourdough")
    row.get_by_label("More for “Sourdough”").click()
    # caret="initial": hiding the caret injects a <style>, which our own CSP refuses.
    page.screenshot(path=str(screenshots / "history-desktop.png"), caret="initial")
    row.get_by_label("Title").fill("Bread, slowly")
    row.get_by_role("button", name="Rename").click()
    expect(page.locator("#history-list")).to_contain_text("Bread, slowly")

    row = page.locator(".history__item", has_text="Bread, slowly")
    row.get_by_label("More for “Bread, slowly”").click()
    row.get_by_role("button", name="Delete").click()
    expect(page.locator("#history-list")).to_contain_text("Deleted “Bread, slowly”")
    page.reload()
    expect(page.get_by_role("heading", name="This conversation is not here")).to_be_visible()
    page.goto(server.url + "/")
    expect(page.locator("#history-list .history__link")).to_have_text(["Train to Lisbon"])

    page.goto(server.url + "/")
    # Undo comes with the delete; a page loaded later no longer offers it, so do it again.
    path = imported(page, server, "Undo me", RECIPE[:2])
    page.goto(server.url + "/")
    row = page.locator(".history__item", has_text="Undo me")
    row.get_by_label("More for “Undo me”").click()
    row.get_by_role("button", name="Delete").click()
    page.get_by_role("button", name="Undo").click()
    expect(page.locator(".history__link", has_text="Undo me")).to_be_visible()
    page.goto(server.url + path)
    expect(page.locator("#history-list [aria-current=page]")).to_have_text("Undo me")


def test_at_phone_width_the_history_is_a_drawer(open_page, server, screenshots):
    page = open_page(server.url, viewport=PHONE)
    path = imported(page, server, "Sourdough", RECIPE)
    page.goto(server.url + path)
    sidebar = page.locator("#sidebar")
    expect(sidebar).not_to_be_visible()
    page.screenshot(path=str(screenshots / "history-phone-chat.png"), caret="initial")
    page.get_by_role("button", name="Conversations").click()
    expect(sidebar).to_be_visible()
    expect(page.locator("#history-search")).to_be_focused()
    expect(sidebar).to_have_css("transform", "none")  # slid all the way in
    page.screenshot(path=str(screenshots / "history-phone-drawer.png"), caret="initial")
    assert page.evaluate("document.documentElement.scrollWidth <= "
                         "document.documentElement.clientWidth")
    page.keyboard.press("Escape")
    expect(sidebar).not_to_be_visible()
    page.get_by_role("button", name="Conversations").click()
    page.get_by_role("link", name="Sourdough").click()
    expect(page).to_have_url(server.url + path)


def test_a_new_chat_is_listed_after_its_first_reply_and_the_url_follows(open_page, server):
    page = open_page(server.url, viewport=DESKTOP)
    chat_once(page, "the first words of a new chat")
    expect(page).to_have_url(CONVERSATION_PATH)
    expect(page.locator("#history-list [aria-current=page]")).to_have_text(
        "echo the first words of a new chat")
    page.reload()
    expect(page.locator("#messages")).to_contain_text("the first words of a new chat")
    # New chat: the address goes back to "/", and the conversation left stays listed.
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
    page.get_by_role("button", name="New chat").click()
    expect(page).to_have_url(server.url + "/")
    expect(page.locator(".turn")).to_have_count(0)
    expect(page.locator("#history-list")).to_contain_text("echo the first words of a new chat")


# -- the widget: its own conversation per embedding site ---------------------------------------

@pytest.fixture(scope="module")
def widget_sites(tmp_path_factory):
    """The widget's server on 127.0.0.1, and two sites that embed it: one on localhost (another
    site: its own cookie partition) and one on another 127.0.0.1 port (another origin)."""
    folder = tmp_path_factory.mktemp("embedders")
    embedder, other = StaticSite(folder), StaticSite(folder)
    sites = [embedder.origin.replace("127.0.0.1", "localhost"), other.origin]
    server = LiveServer(tmp_path_factory.mktemp("widget-history"))
    server.start(fake={"step_delay": 0.005}, widgetAllowedOrigins=sites)
    (folder / "embed.html").write_text(
        '<!doctype html><link rel="icon" href="data:,"><title>Embedder</title>'
        f'<iframe src="{server.url}/widget" title="Chat" width="380" height="560"></iframe>')
    yield server, sites
    server.stop()
    embedder.stop()
    other.stop()


def test_the_widget_reopens_its_conversation_on_the_same_site_only(open_page, widget_sites):
    server, (site, other_site) = widget_sites
    page = open_page(site + "/embed.html")
    chat_once(page.frame_locator("iframe"), "Where is my parcel?")
    page.reload()  # the same site: its conversation again
    widget = page.frame_locator("iframe")
    expect(widget.locator("#turn-1-reply")).to_contain_text("Where is my parcel?")
    page.goto(other_site + "/embed.html")  # another site, the same browser: a new chat
    widget = page.frame_locator("iframe")
    expect(widget.locator("#connection-state")).to_have_attribute("data-state", "connected")
    expect(widget.get_by_role("heading", name="Ask a question to start.")).to_be_visible()
    expect(widget.locator(".turn")).to_have_count(0)


# -- a conversation outlives the page and the server -------------------------------------------

def test_a_reload_mid_reply_shows_it_so_far_and_it_goes_on(open_page, fake_server):
    # About 370 characters at 20 ms each: the reload lands in the middle of the reply.
    fake_server.start(fake={"step_delay": 0.02})
    page = open_page(fake_server.url)
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
    page.locator("#prompt").fill("count 120")
    page.locator("#prompt").press("Enter")
    expect(page.locator("#turn-1-reply [aria-busy=true]")).to_contain_text("1 2 3")
    expect(page).to_have_url(CONVERSATION_PATH)  # stored with its first message
    page.reload()
    expect(page.locator("#turn-1-prompt .message__content")).to_have_text("count 120")
    reply = page.locator("#turn-1-reply")
    expect(reply.locator("[aria-busy=true]")).to_be_attached()  # still being written
    expect(reply.locator("[aria-busy=true]")).to_have_count(0, timeout=REPLY_DEADLINE_MS)
    # No gap and no repeat across the reload: exactly the whole count.
    expect(reply.locator(".message__content")).to_have_text(
        " ".join(str(i) for i in range(1, 121)))


def test_the_history_is_still_there_after_a_restart(open_page, fake_server):
    fake_server.start(fake={"step_delay": 0.005})
    page = open_page(fake_server.url)
    chat_once(page, "kept across a restart")
    expect(page).to_have_url(CONVERSATION_PATH)
    path = page.url.removeprefix(fake_server.url)
    page.goto("about:blank")  # no socket left to fail while the server is down
    fake_server.stop()
    fake_server.start(fake={"step_delay": 0.005})  # the same settings and database; a new port
    page.goto(fake_server.url + path)  # cookies are per host, not per port: the same browser
    expect(page.locator("#turn-1-reply")).to_contain_text("kept across a restart")
    expect(page.locator("#history-list [aria-current=page]")).to_have_text(
        "echo kept across a restart")

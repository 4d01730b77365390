"""The chat UI and the widget in real headless Chromium (Debian's ``chromium``, driven by
Playwright's Python package; no browser is ever downloaded), against a live server on the fake
backend, and once on the real model.

Every page is watched for console errors, CSP violations included. The screenshots in ``docs/``
are taken here, from a conversation with a canned reply that shows a heading, a list, a code
block and a table: into a temporary folder, or into the folder named by
``TANGLEBOX_SCREENSHOTS_DIR`` (``TANGLEBOX_SCREENSHOTS_DIR=docs`` refreshes the README's), so a
test run leaves the checkout as it was.
"""

from __future__ import annotations

import functools
import os
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import websocket

from tests.live_server import LiveServer
from tests.reply_page import element_end

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright Python package is not installed")
expect = sync_api.expect
expect.set_options(timeout=15_000)  # a bound for failing on a busy CI machine, not a speed goal

from tests.browser.conftest import DESKTOP, PHONE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
REPLY_DEADLINE_MS = 30_000  # a bound for failing, not a speed requirement
REAL_MODEL_DEADLINE_MS = 180_000  # the real model on 2 busy cores (CI runs other jobs too)

QUESTION = "How do I read a CSV file in Python?"
ANSWER = """## Reading a CSV file in Python

Use the standard library's `csv` module:

1. Open the file with `newline=""`.
2. Wrap it in a `csv.DictReader`.
3. Loop over the rows: each one is a `dict`.

```python
import csv

with open("sales.csv", newline="") as f:
    for row in csv.DictReader(f):
        print(row["region"], row["total"])
```

| Option | What it does |
|---|---|
| `delimiter` | The field separator, `,` by default |
| `quotechar` | Wraps fields that contain the separator |

See the [csv documentation](https://docs.python.org/3/library/csv.html) for more."""
# README's screenshots: code, math and a table, with two older conversations in the sidebar.
SHOWCASE = "What is the area of a circle, and how do I compute it in Python?"
SHOWCASE_REPLY = r"""## The area of a circle

A circle of radius $r$ has the area \(A = \pi r^2\) and the circumference $C = 2\pi r$, so

$$
A = \frac{C^2}{4\pi}
$$

```python
import math

def area(radius: float) -> float:
    return math.pi * radius ** 2
```

| Radius | Area | Circumference |
|---|---:|---:|
| 1 | 3.14 | 6.28 |
| 2 | 12.57 | 12.57 |

At a radius of 2 the two are equal."""
OLDER_CONVERSATIONS = {
    "How long should sourdough proof?": "About **4 to 6 hours** at room temperature.",
    "How do I read a CSV file in Python?": "Use the standard library's `csv` module.",
}
# About 1,400 characters of Markdown: 14 s at the fake backend's 10 ms a character here.
LONG_REPLY = """## Streaming, block by block

Each block of this reply is sent **once**, when the next one begins; only the open block is
rendered again while it grows. A payload split across tokens, like <scr""" + """ipt>alert(1)
</script> or [a link](java""" + """script:alert(1)), stays text.

1. The first item.
2. The second item.

3. A third item after a blank line: the list is loose now, every item a paragraph.

```html
<script>document.title = "pwned"</script>
<img src=x onerror=alert(1)>
```

| Block | Sent |
|---|---|
| finished | once |
| open | again, whole |
| note | at the end |

> A quote that goes on
> over two lines.

See [the docs][docs] for more.

[docs]: https://example.com/docs

That is the whole reply."""
WIDE_REPLY = ("echo A long line: " + "x" * 300 + "\n\nhttps://example.com/" + "a" * 200 +
              "\n\n```\n" + "y = 1  # " + "z" * 300 + "\n```\n\n| " + " | ".join(
                  f"column {i}" for i in range(12)) + " |\n|" + "---|" * 12 + "\n| " +
              " | ".join("value" for _ in range(12)) + " |")


# -- fixtures --------------------------------------------------------------------------------

class StaticSite:
    """Another origin on this machine: a tiny http.server serving one folder."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.origin = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:  # noqa: A002 - http.server's signature
        pass


@pytest.fixture(scope="module")
def embedding_sites(tmp_path_factory):
    """Two other origins: one allowed to frame the widget, one not."""
    folder = tmp_path_factory.mktemp("embedding-site")
    allowed, foreign = StaticSite(folder), StaticSite(folder)
    yield folder, allowed, foreign
    allowed.stop()
    foreign.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory, embedding_sites):
    folder, allowed, _ = embedding_sites
    server = LiveServer(tmp_path_factory.mktemp("browser"))
    server.start(fake={"step_delay": 0.01,
                       "replies": {QUESTION: ANSWER, SHOWCASE: SHOWCASE_REPLY}},
                 maxNewTokens=3000, maxNewTokensLimit=4000,
                 widgetAllowedOrigins=[allowed.origin], widgetTitle="Ask the docs")
    (folder / "embed.html").write_text(
        '<!doctype html><link rel="icon" href="data:,"><title>A site that embeds the widget'
        "</title><h1>Docs</h1>"
        f'<iframe src="{server.url}/widget" title="Chat" width="380" height="560"></iframe>')
    yield server
    server.stop()


def connected(page):
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
    return page


def send(page, text: str) -> None:
    prompt = page.locator("#prompt")
    prompt.fill(text)
    prompt.press("Enter")


def finished_reply(page, turn: int = 1, deadline_ms: int = REPLY_DEADLINE_MS):
    """The reply, once it is on the page and its open (aria-busy) end is gone."""
    reply = page.locator(f"#turn-{turn}-reply")
    expect(reply).to_be_attached()
    expect(reply.locator("[aria-busy=true]")).to_have_count(0, timeout=deadline_ms)
    return reply


def no_horizontal_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= "
                         "document.documentElement.clientWidth")


# -- the chat --------------------------------------------------------------------------------

def test_enter_sends_and_the_reply_streams_in_then_finishes(open_page, server):
    page = connected(open_page(server.url))
    expect(page.get_by_role("banner")).to_contain_text("fake-model")  # model and device
    expect(page.get_by_role("banner")).to_contain_text("cpu")
    send(page, "count 150")

    expect(page.locator("#turn-1-prompt .message__content")).to_have_text("count 150")
    streaming = page.locator("#turn-1-reply .message__content > [aria-busy=true]")
    expect(streaming).to_contain_text("1 2 3")  # partial
    expect(page.locator("#prompt")).to_be_disabled()
    expect(page.get_by_role("button", name="Stop")).to_be_visible()
    expect(page.locator("#messages")).to_have_attribute("aria-live", "polite")

    reply = finished_reply(page)
    expect(reply.locator(".message__content")).to_have_text(
        " ".join(str(i) for i in range(1, 151)))
    expect(page.locator("#prompt")).to_be_enabled()
    expect(page.locator("#prompt")).to_be_focused()
    expect(page.locator("#prompt")).to_have_value("")


def test_shift_enter_makes_a_new_line_and_code_blocks_get_a_working_copy_button(
        open_page, server):
    page = connected(open_page(server.url))
    prompt = page.locator("#prompt")
    prompt.click()
    for line in ("echo Here:", "```python", "print('hi')", "```"):
        page.keyboard.type(line)
        page.keyboard.press("Shift+Enter")
    expect(page.locator(".turn")).to_have_count(0)  # Shift+Enter did not send
    page.keyboard.press("Enter")

    code = finished_reply(page).locator(".code-block code")
    expect(code).to_have_class("language-python")
    expect(code).to_have_text("print('hi')")
    copy = page.locator("#turn-1-reply").get_by_role("button", name="Copy code")
    copy.click()
    expect(copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == "print('hi')\n"


def test_stop_ends_the_reply(open_page, server):
    page = connected(open_page(server.url))
    send(page, "count 3000")
    expect(page.locator("#turn-1-reply .message__content > [aria-busy=true]")).to_contain_text(
        "3")
    page.get_by_role("button", name="Stop").click()
    reply = finished_reply(page)
    expect(reply.locator(".message__note")).to_have_text("Stopped.")
    expect(page.locator("#prompt")).to_be_enabled()
    assert "3000" not in reply.inner_text()


def test_new_chat_clears_the_conversation(open_page, server):
    page = connected(open_page(server.url))
    send(page, "echo first")
    finished_reply(page)
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".turn")).to_have_count(0)
    expect(page.get_by_role("heading", name="What can I help with?")).to_be_visible()
    send(page, "echo fresh start")
    # A new conversation numbers its turns from 1: the socket stopped watching the old one's
    # reply before it showed the new chat, so no late fragment of it lands here.
    expect(finished_reply(page, turn=1).locator(".message__content")).to_have_text("fresh start")
    expect(page.locator(".turn")).to_have_count(1)


def test_regenerate_writes_the_last_reply_again(open_page, server):
    page = connected(open_page(server.url))
    regenerate = page.get_by_role("button", name="Regenerate")
    expect(regenerate).to_be_disabled()
    send(page, "echo once more")
    finished_reply(page)
    regenerate.click()
    expect(finished_reply(page).locator(".message__content")).to_have_text("once more")
    expect(page.locator(".turn")).to_have_count(1)


def test_settings_apply_to_the_conversation_and_bad_values_are_named(open_page, server):
    page = connected(open_page(server.url))
    page.get_by_text("Settings", exact=True).click()
    page.get_by_label("Temperature").fill("7")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#temperature-error")).to_contain_text("from 0 to 2")
    expect(page.get_by_label("Temperature")).to_have_attribute("aria-invalid", "true")

    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max new tokens").fill("5")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#settings-status")).to_have_text("Applied to this conversation.")
    page.keyboard.press("Escape")
    send(page, "count 50")
    reply = finished_reply(page)
    expect(reply.locator(".message__content")).to_have_text("1 2 3")
    expect(reply.locator(".message__note")).to_contain_text("limit of 5 new tokens")


def test_untrusted_text_stays_text_in_the_browser(open_page, server):
    page = connected(open_page(server.url))
    payload = ('<img src=x onerror="document.title=\'pwned\'"> '
               '<div hx-get="/health" hx-trigger="load" hx-target="body">x</div> '
               "[click](javascript:document.title='pwned')")
    send(page, "echo " + payload)
    reply = finished_reply(page)
    expect(reply).to_contain_text("<img src=x")
    assert page.locator("#messages img, #messages [hx-get], #messages a").count() == 0
    assert page.title() != "pwned"


def test_a_phone_sized_screen_never_scrolls_sideways(open_page, server):
    page = connected(open_page(server.url, viewport=PHONE))
    assert no_horizontal_scroll(page)
    send(page, WIDE_REPLY)
    finished_reply(page)
    expect(page.locator("#turn-1-reply table")).to_be_visible()
    assert no_horizontal_scroll(page)
    assert page.evaluate("(() => { const c = document.getElementById('chat-scroll');"
                         " return c.scrollWidth <= c.clientWidth; })()")


def test_a_long_markdown_reply_streams_block_by_block_and_ends_as_history_renders_it(
        open_page, server, tmp_path):
    page = connected(open_page(server.url))
    # What the open code block shows at each change of the page, while it is open.
    page.evaluate("""() => {
        window.openCode = [];
        new MutationObserver(() => {
            const code = document.querySelector("#turn-1-reply-open code");
            if (code) window.openCode.push(code.textContent);
        }).observe(document.getElementById("chat-scroll"),  // #messages itself is replaced
                   {childList: true, subtree: true, characterData: true});
    }""")
    send(page, "echo " + LONG_REPLY)
    content = page.locator("#turn-1-reply .message__content")
    open_end = content.locator(":scope > #turn-1-reply-open[aria-busy=true]")
    # While it streams: the finished blocks stand rendered before the open end.
    code = content.locator(":scope > .code-block code.language-html")
    expect(code).to_contain_text("</script>")
    expect(open_end).to_be_visible()
    expect(content.locator(":scope > h2")).to_have_text("Streaming, block by block")
    # The list went on across a blank line, and was sent once it had ended.
    expect(content.locator(":scope > ol > li")).to_have_count(3)
    page.screenshot(path=str(tmp_path / "streaming.png"), caret="initial")

    finished_reply(page)
    expect(content.locator(":scope > .table-scroll table tbody tr")).to_have_count(3)
    expect(content.locator("a[href='https://example.com/docs']")).to_have_text("the docs")
    expect(content.locator(":scope > p").last).to_have_text("That is the whole reply.")
    assert page.locator("#messages script, #messages img, #messages [onerror]").count() == 0
    # The open code block grew by whole lines and its last line, always a prefix of the code.
    final_code = code.text_content()
    open_code = page.evaluate("window.openCode")
    assert any(text.startswith('<script>document.title = "pwned"</script>\n<img')
               for text in open_code)
    assert all(final_code.startswith(text.rstrip("`")) for text in open_code)
    page.screenshot(path=str(tmp_path / "finished.png"), caret="initial", full_page=True)

    # The page now holds exactly what a reconnect gets from history, rendered at once.
    socket_url = page.locator("[ws-connect]").get_attribute("ws-connect")
    cookies = "; ".join(f"{c['name']}={c['value']}" for c in page.context.cookies())
    again = websocket.create_connection(server.ws_url + socket_url, timeout=30,
                                        cookie=cookies)  # the same browser's conversation
    try:
        sync = again.recv()
    finally:
        again.close()
    start = sync.index('<article id="turn-1-reply"')
    history = sync[start:element_end(sync, start)]
    assert page.evaluate("""(html) => {
        const template = document.createElement("template");
        template.innerHTML = html;
        return template.content.firstElementChild.outerHTML ===
            document.getElementById("turn-1-reply").outerHTML;
    }""", history)


def test_chromium_gets_the_chat_socket_compressed(browser, server):
    """bench.ui_deltas counts the socket's bytes as compressed frames: that holds only if a
    browser and the server (gunicorn's gevent worker, simple-websocket) agree on
    permessage-deflate. Chromium's own record of the handshake says whether they did."""
    context = browser.new_context()
    try:
        page = context.new_page()
        cdp = context.new_cdp_session(page)
        offers, answers = [], []
        cdp.on("Network.webSocketWillSendHandshakeRequest",
               lambda event: offers.append(_lower_keys(event["request"]["headers"])))
        cdp.on("Network.webSocketHandshakeResponseReceived",
               lambda event: answers.append(_lower_keys(event["response"]["headers"])))
        cdp.send("Network.enable")
        page.goto(server.url)
        connected(page)
        send(page, "count 40")  # and the compressed frames read as a reply
        expect(finished_reply(page).locator(".message__content")).to_have_text(
            " ".join(str(i) for i in range(1, 41)))
    finally:
        context.close()
    assert offers and offers[0]["sec-websocket-extensions"].startswith("permessage-deflate")
    assert answers and answers[0]["sec-websocket-extensions"].startswith("permessage-deflate")
    assert "no_context_takeover" not in answers[0]["sec-websocket-extensions"]


def _lower_keys(headers: dict) -> dict:
    return {name.lower(): value for name, value in headers.items()}


@pytest.mark.parametrize("color_scheme, viewport, name, scale", [
    ("light", DESKTOP, "screenshot-desktop.png", 1),
    ("dark", PHONE, "screenshot-phone.png", 2),
])
def test_screenshots_of_a_conversation(open_page, server, color_scheme, viewport, name, scale,
                                       tmp_path):
    from tests.browser.test_history_ui import imported  # that module imports this one

    page = open_page(server.url, viewport=viewport, color_scheme=color_scheme,
                     device_scale_factor=scale)
    for question, answer in OLDER_CONVERSATIONS.items():
        imported(page, server, question, [{"role": "user", "content": question},
                                          {"role": "assistant", "content": answer}])
    page.goto(server.url)
    connected(page)
    send(page, SHOWCASE)
    expect(finished_reply(page).locator("table")).to_be_visible()
    expect(page.locator("#turn-1-reply math").first).to_be_visible()
    expect(page.locator("#history-list .history__link")).to_have_count(3)  # this one listed
    if viewport is PHONE:
        page.evaluate("document.getElementById('chat-scroll').scrollTop = 0")  # the question
    folder = Path(os.environ.get("TANGLEBOX_SCREENSHOTS_DIR") or tmp_path)
    folder = folder if folder.is_absolute() else ROOT / folder
    folder.mkdir(parents=True, exist_ok=True)
    # caret="initial": hiding the caret injects a <style>, which our own CSP refuses.
    page.screenshot(path=str(folder / name), caret="initial")
    assert (folder / name).read_bytes().startswith(b"\x89PNG")


def test_after_an_idle_close_the_page_reconnects_when_used_and_the_conversation_goes_on(
        open_page, fake_server):
    fake_server.start(fake={}, socketIdleTimeoutSeconds=1)
    page = open_page(fake_server.url)
    send(page, "echo before the pause")
    finished_reply(page)
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "idle")
    send(page, "echo after the pause")  # typing wakes the socket; the message waits for it
    expect(finished_reply(page, turn=2).locator(".message__content")).to_have_text(
        "after the pause")
    expect(page.locator(".turn")).to_have_count(2)


# -- the widget ------------------------------------------------------------------------------

def test_the_widget_works_inside_an_iframe_on_an_allowed_origin(open_page, server,
                                                                embedding_sites):
    _, allowed, _ = embedding_sites
    page = open_page(f"{allowed.origin}/embed.html")
    widget = page.frame_locator("iframe")
    expect(widget.locator("#connection-state")).to_have_attribute("data-state", "connected")
    expect(widget.get_by_text("Ask the docs")).to_be_visible()
    widget.locator("#prompt").fill("echo Hello from the **widget**")
    widget.locator("#prompt").press("Enter")
    reply = widget.locator("#turn-1-reply")
    expect(reply).to_be_attached()
    expect(reply.locator("[aria-busy=true]")).to_have_count(0, timeout=REPLY_DEADLINE_MS)
    expect(reply.locator("strong")).to_have_text("widget")


def test_the_widget_is_refused_in_an_iframe_on_another_origin(browser, server, embedding_sites):
    _, _, foreign = embedding_sites
    context = browser.new_context()
    try:
        page = context.new_page()
        with page.expect_console_message(lambda m: "frame-ancestors" in m.text):
            page.goto(f"{foreign.origin}/embed.html")
        expect(page.get_by_role("heading", name="Docs")).to_be_visible()
        [frame] = [f for f in page.frames if f is not page.main_frame]
        assert not frame.url.startswith(server.url)  # Chromium shows its error page instead
        assert frame.locator("#prompt").count() == 0
    finally:
        context.close()


def test_the_widget_ignores_a_prompt_in_its_url(open_page, server):
    page = connected(open_page(f"{server.url}/widget?userPrompt=echo+pwned&q=echo+pwned"))
    expect(page.locator("#prompt")).to_have_value("")
    expect(page.locator(".turn")).to_have_count(0)


# -- the real model --------------------------------------------------------------------------

@pytest.mark.real_model
def test_the_real_model_streams_a_reply_in_the_browser(open_page, tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    server = LiveServer(tmp_path).start(fake=None, temperature=0, maxNewTokens=48)
    try:
        page = connected(open_page(server.url))
        # Every update the socket sends is its own DOM change, so an observer sees each one:
        # the reply showed text while still busy (streamed), however fast the model is.
        page.evaluate("""() => {
            window.sawPartialReply = false;
            new MutationObserver(() => {
                const busy = document.querySelector(
                    "#turn-1-reply .message__content > [aria-busy=true]");
                if (busy && busy.textContent.trim()) window.sawPartialReply = true;
            }).observe(document.body, {subtree: true, childList: true, characterData: true});
        }""")
        send(page, "What is the capital of France?")
        reply = finished_reply(page, deadline_ms=REAL_MODEL_DEADLINE_MS)
        assert page.evaluate("window.sawPartialReply"), "no update showed the reply as it grew"
        expect(reply.locator(".message__content")).not_to_be_empty()
        expect(page.locator("#prompt")).to_be_enabled()
        send(page, "Thank you!")  # a second turn, on top of the first one's history
        expect(finished_reply(page, turn=2, deadline_ms=REAL_MODEL_DEADLINE_MS).locator(
            ".message__content")).not_to_be_empty()
    finally:
        server.stop()

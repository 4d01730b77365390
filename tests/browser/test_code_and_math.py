"""A reply with code and math in real headless Chromium: code tokens coloured by the stylesheet
of the page's color scheme (classes only: the CSP refuses styles, and any CSP violation fails
the test), formulas drawn as MathML. Screenshots, light and dark, go to a temporary folder or
to ``TANGLEBOX_SCREENSHOTS_DIR``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.browser.test_chat_ui import ROOT, connected, finished_reply, send
from tests.live_server import LiveServer

pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright Python package is not installed")
expect = sync_api.expect

QUESTION = "What is the area of a circle, and how do I compute it?"
ANSWER = r"""The area of a circle of radius $r$ is \(A = \pi r^2\). For the circumference:

$$
C = 2\pi r = \frac{2A}{r}
$$

In Python:

```python
import math

def area(radius: float) -> float:
    # pi times the radius squared
    return math.pi * radius ** 2

print(f"{area(2.0):.2f}")  # 12.57
```

And \[ \sum_{i=1}^{n} i = \frac{n(n+1)}{2} \] sums the first $n$ numbers."""
# What each scheme's stylesheet gives a keyword: Pygments' "xcode" and "github-dark" styles.
KEYWORD_COLOUR = {"light": "rgb(169, 13, 145)", "dark": "rgb(255, 123, 114)"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("code-and-math"))
    server.start(fake={"step_delay": 0.002, "replies": {QUESTION: ANSWER}})
    yield server
    server.stop()


def colour(locator) -> str:
    return locator.evaluate("element => getComputedStyle(element).color")


@pytest.mark.parametrize("color_scheme", ["light", "dark"])
def test_code_is_highlighted_and_math_is_drawn(open_page, server, color_scheme, tmp_path):
    page = connected(open_page(server.url, color_scheme=color_scheme))
    send(page, QUESTION)
    content = finished_reply(page).locator(".message__content")

    code = content.locator(".code-block code.language-python")
    keyword, string, comment = (code.locator(f"span.{name}").first
                                for name in ("k", "s2", "c1"))
    expect(keyword).to_have_text("def")
    expect(comment).to_have_text("# pi times the radius squared")
    assert colour(keyword) == KEYWORD_COLOUR[color_scheme]
    assert len({colour(keyword), colour(string), colour(comment), colour(code)}) == 4
    assert code.locator("[style]").count() == 0

    formulas = content.locator("math")
    expect(formulas).to_have_count(5)  # $r$, \(…\), $$…$$, \[…\] inside the text, $n$
    expect(content.locator(".math.block math[display=block] mfrac")).to_have_count(1)
    box = content.locator(".math.block math").bounding_box()
    assert box is not None and box["width"] > 40 and box["height"] > 20  # a fraction: tall
    assert "$" not in content.inner_text() and "\\frac" not in content.inner_text()

    folder = Path(os.environ.get("TANGLEBOX_SCREENSHOTS_DIR") or tmp_path)
    folder = folder if folder.is_absolute() else ROOT / folder
    folder.mkdir(parents=True, exist_ok=True)
    # caret="initial": hiding the caret injects a <style>, which our own CSP refuses.
    page.screenshot(path=str(folder / f"code-and-math-{color_scheme}.png"), caret="initial",
                    full_page=True)

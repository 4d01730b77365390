"""Code in a reply is highlighted on the server: Pygments tokens as classes, never styles;
coloured by two committed stylesheets that are exactly Pygments' output; a fence still open
while a reply streams stays plain (its lines go out once each) and turns coloured when closed.
"""

from __future__ import annotations

import re

import pytest

from scripts.pygments_css import stylesheet_path
from tanglebox.code_highlight import THEMES, stylesheet
from tanglebox.markdown_render import render_markdown
from tests.unit.test_markdown_blocks import every_character, stream
from tests.unit.test_markdown_render import assert_inert, elements

SCRIPT = "#!/bin/bash\nfor f in *.txt; do\n  echo \"$f\"\ndone\n"


def token_classes(html: str) -> list[str]:
    return [attrs["class"] or "" for tag, attrs in elements(html) if tag == "span"
            and "code-block__language" not in (attrs.get("class") or "")]


def test_a_fence_with_a_language_is_highlighted_with_classes_only():
    html = render_markdown("```python\nimport os\nprint('<script>')  # done\n```")
    assert_inert(html)
    assert "style=" not in html
    classes = token_classes(html)
    assert {"kn", "nn", "nb", "c1"} <= set(classes)  # keyword, module, builtin, comment
    assert '<span class="s1">&#x27;&lt;script&gt;&#x27;</span>' in html or \
        "<span class=\"s1\">'&lt;script&gt;'</span>" in html


def test_an_unknown_language_stays_plain_text_with_its_label():
    html = render_markdown("```nosuchlanguage\nx = <b>\n```")
    assert token_classes(html) == []
    assert "<code class=\"language-nosuchlanguage\">x = &lt;b&gt;\n</code>" in html


def test_code_without_a_language_is_guessed_only_when_confident():
    guessed = render_markdown("```\n" + SCRIPT + "```")
    assert '<span class="code-block__language">bash</span>' in guessed
    assert token_classes(guessed)
    for plain in ("```\n#!/bin/sh\nls\necho\n```",  # too short to guess
                  "```\n#!/bin/bash\necho 'two lines are too few to guess from'\n```",
                  "```\nThese are three lines\nof plain prose that no\nlexer claims.\n```"):
        html = render_markdown(plain)
        assert token_classes(html) == [] and "code-block__language\">text<" in html


def test_an_open_fence_stays_plain_until_it_is_closed_or_the_message_ends():
    assert token_classes(render_markdown("```python\nimport os\n", whole=False)) == []
    assert token_classes(render_markdown("```python\nimport os\n```", whole=False))
    # a whole message whose fence never closed (a reply cut at its token limit): coloured
    assert token_classes(render_markdown("```python\nimport os\n"))


def test_a_streamed_fence_is_highlighted_once_closed_and_the_page_equals_the_render():
    text = "Run:\n\n```python\nimport os\nprint(os.getcwd())\n```\n\nThen:\n\n```\n" + SCRIPT
    text += "```\n\nDone."
    page = stream(text, every_character(text))  # the page equals render_markdown at each step
    assert page.finished.count('class="kn"') == 1 and 'class="code-block__language">bash' in \
        page.finished
    for piece in page.pieces:
        assert_inert(piece)


@pytest.mark.parametrize("theme", sorted(THEMES))
def test_the_committed_stylesheets_are_pygments_output(theme):
    committed = stylesheet_path(theme).read_text(encoding="utf-8")
    assert committed == stylesheet(theme), "run: python -m scripts.pygments_css"
    assert re.search(r"^\.code-block code \.k \{ color: #", committed, re.MULTILINE)


def contrast(foreground: str, background: str) -> float:
    """WCAG 2's contrast ratio of two #rgb or #rrggbb colours."""
    def luminance(colour: str) -> float:
        hex_digits = colour.lstrip("#")
        if len(hex_digits) == 3:
            hex_digits = "".join(digit * 2 for digit in hex_digits)
        channels = [int(hex_digits[i:i + 2], 16) / 255 for i in (0, 2, 4)]
        r, g, b = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
                   for c in channels]
        return 0.2126 * r + 0.7152 * g + 0.0722 * b
    lighter, darker = sorted((luminance(foreground), luminance(background)), reverse=True)
    return (lighter + 0.05) / (darker + 0.05)


@pytest.mark.parametrize("theme", sorted(THEMES))
def test_every_token_colour_is_readable_on_the_code_background(theme):
    # app.css: the light --code-bg first, the dark one in its prefers-color-scheme block.
    app_css = (stylesheet_path(theme).parent / "app.css").read_text(encoding="utf-8")
    backgrounds = re.findall(r"--code-bg: (#[0-9a-fA-F]{6});", app_css)
    code_bg = backgrounds[0] if theme == "light" else backgrounds[1]
    rules = re.findall(r"^\.code-block code \.(\S+) \{ color: (#[0-9A-Fa-f]{3,6})"
                       r"(?:; background-color: (#[0-9A-Fa-f]{3,6}))?",
                       stylesheet_path(theme).read_text(encoding="utf-8"), re.MULTILINE)
    assert len(rules) > 20
    unreadable = [(token, colour) for token, colour, background in rules
                  if token != "w"  # whitespace: no glyphs to read
                  and contrast(colour, background or code_bg) < 4.5]
    assert unreadable == []  # WCAG AA for text

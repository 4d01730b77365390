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


def test_an_open_fence_stays_plain_until_it_is_closed():
    assert token_classes(render_markdown("```python\nimport os\n")) == []
    assert token_classes(render_markdown("```python\nimport os\n```"))


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

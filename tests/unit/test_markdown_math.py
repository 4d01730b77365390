"""Math in Markdown becomes MathML on the server, from an allow-list: hostile LaTeX (links,
styles, markup in text, huge or deep input) reaches the page as inert MathML or as code; a
streamed ``$$`` block still open never breaks the text after it."""

from __future__ import annotations

from xml.etree.ElementTree import Element, SubElement

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tanglebox.markdown_math import _write
from tanglebox.markdown_render import render_markdown
from tests.unit.test_markdown_blocks import every_character, stream, streamed
from tests.unit.test_markdown_render import ALLOWED_ATTRIBUTES, ALLOWED_TAGS, elements

# What MathML may reach the page: written out here, not imported, so a looser list in the code
# fails these tests.
MATH_TAGS = {"math", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msub", "msup",
             "msubsup", "munder", "mover", "munderover", "mfrac", "msqrt", "mroot", "mtable",
             "mtr", "mtd", "mstyle", "mpadded", "mphantom", "menclose"}
MATH_ATTRIBUTES = {"display", "mathvariant", "mathcolor", "stretchy", "fence", "form", "accent",
                   "columnalign", "rowspacing", "columnspacing", "displaystyle", "scriptlevel",
                   "linethickness", "notation", "width", "linebreak", "separator", "lspace",
                   "rspace", "movablelimits", "minsize", "maxsize", "accentunder"}


def assert_inert_math(html: str) -> None:
    for tag, attrs in elements(html):
        assert tag in ALLOWED_TAGS | MATH_TAGS, f"unexpected <{tag}> in {html!r}"
        for name, value in attrs.items():
            assert name in ALLOWED_ATTRIBUTES | MATH_ATTRIBUTES, f"{name} in {html!r}"
            assert "javascript" not in (value or "").lower() and "(" not in (value or "")
        assert tag != "a", html


@pytest.mark.parametrize("text, display", [
    ("Euler: $e^{i\\pi} + 1 = 0$.", "inline"),
    ("Euler: \\(e^{i\\pi} + 1 = 0\\).", "inline"),
    ("Euler: \\[e^{i\\pi} + 1 = 0\\] in a paragraph.", "block"),
    ("$$\ne^{i\\pi} + 1 = 0\n$$", "block"),
    ("\\[\ne^{i\\pi} + 1 = 0\n\\]", "block"),
    ("The identity:\n\\[\ne^{i\\pi} + 1 = 0\n\\]", "block"),
    ("The identity:\n$$\ne^{i\\pi} + 1 = 0\n$$", "block"),
    ("\\begin{equation}\ne^{i\\pi} + 1 = 0\n\\end{equation}", "block"),
])
def test_each_delimiter_becomes_mathml(text, display):
    html = render_markdown(text)
    assert_inert_math(html)
    assert f'<math display="{display}">' in html
    assert "<mi>π</mi>" in html and "<mo>=</mo>" in html and "$" not in html


def test_prices_and_escaped_delimiters_stay_text():
    html = render_markdown("It costs $5 or $10, and \\\\(this\\\\) is not math.")
    assert "<math" not in html and "$5 or $10" in html and "\\(this\\)" in html


@pytest.mark.parametrize("latex, hostile", [
    ("\\href{javascript:alert(1)}{click}", "href"),
    ("\\style{background:url(https://evil.example/x)}{x}", "style"),
    ("\\text{<img src=x onerror=alert(1)>}", "<img"),
    ("\\mbox{<script>alert(1)</script>}", "<script"),
    ("\\unicode{x3C}script\\unicode{x3E}", "<script"),
    ("\\class{hx-get}{x} \\color{red;x:expression(alert(1))}{y}", "expression"),
])
def test_hostile_latex_reaches_the_page_inert(latex, hostile):
    for text in (f"${latex}$", f"$$\n{latex}\n$$", f"\\({latex}\\)"):
        html = render_markdown(text)
        assert_inert_math(html)
        assert hostile not in html
        assert "<math" in html or 'class="math-source"' in html


def test_text_in_a_formula_is_escaped_not_markup():
    html = render_markdown("$\\text{<b>bold</b> & co}$")
    assert "<mtext>&lt;b&gt;bold&lt;/b&gt;" in html and "&amp;" in html


def test_only_allow_listed_elements_and_attributes_are_written():
    math = Element("math", {"display": "inline", "onclick": "alert(1)"})
    row = SubElement(math, "mrow", {"href": "javascript:alert(1)", "style": "color:red"})
    SubElement(row, "script").text = "alert(1)"
    SubElement(row, "mi", {"mathvariant": "bold\" onmouseover=\"x"}).text = "&#x3C;b&#x3E;"
    out: list[str] = []
    _write(math, out)
    assert "".join(out) == '<math display="inline"><mrow><mi>&lt;b&gt;</mi></mrow></math>'


@pytest.mark.parametrize("latex", [
    "\\frac{1}{",  # does not parse
    "x^2^3",  # double superscript
    "x+" * 1001,  # over the size cap of 2000 characters
    "{" * 3000 + "x" + "}" * 3000,  # deeper than the converter's recursion
    "\\sqrt{" * 400 + "x" + "}" * 400,
])
def test_a_formula_that_does_not_convert_is_shown_as_code(latex):
    html = render_markdown(f"Before ${latex}$ after")
    assert '<code class="math-source">' in html and "<math" not in html
    assert "Before" in html and "after" in html


def test_huge_inputs_of_every_shape_finish_and_stay_inert():
    for latex in ("\\" * 1999, "^" * 1999, "\\frac" * 399, "\\begin{matrix}" * 140,
                  "&" * 1999, "\\left(" * 333, "a_{" * 600):
        html = render_markdown(f"$${latex}$$")
        assert_inert_math(html)


def test_a_streamed_display_block_still_open_does_not_break_later_text():
    text = ("Intro.\n\n$$\n\\sum_{i=1}^{n} i\n- not a list\n# not a heading\n$$\n\n"
            "After the formula, **bold** and `code`.\n")
    page = stream(text, every_character(text))  # equals render_markdown at every step
    assert page.finished.count("<math") == 1 and "<strong>bold</strong>" in page.finished
    assert "<h1>" not in page.finished and "<ul>" not in page.finished


def test_an_unclosed_display_block_is_text_and_what_follows_renders():
    text = "$$\nx^2\n\nAfter, **bold**.\n\n\\[\ny\n\n\\begin{align}\na\n\n# Heading"
    page = stream(text, every_character(text))
    assert "<math" not in page.finished
    assert "<strong>bold</strong>" in page.finished and "<h1>Heading</h1>" in page.finished


# Openers and closers often, and blocks that interrupt a paragraph (a heading, a list, a quote)
# between them: the case where a finished block could still turn into math.
LINE_STARTS = ["", "$$", "$$", "\\[", "\\]", "x\\]", "\\begin{align}", "\\end{align}", "a\\\\",
               "# ", "# ", "- ", "> ", "```", "1. ", "    ", "|---|---|", "---", "$"]
WORDS = ["x", "$x$", "\\(y\\)", "$$", "\\[", "\\]", "a | b", "**b**", "`c`", "$5", "\\frac{1}{2}"]


@st.composite
def math_markdown(draw) -> str:
    lines = draw(st.lists(st.tuples(st.sampled_from(LINE_STARTS),
                                    st.lists(st.sampled_from(WORDS), max_size=3)),
                          min_size=1, max_size=12))
    return "".join(start + " ".join(words) + draw(st.sampled_from(["\n"] * 5 + ["\n\n"]))
                   for start, words in lines)


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(streamed(math_markdown()))
def test_streamed_math_equals_the_one_shot_render_at_every_step(case):
    text, cuts = case
    page = stream(text, cuts)
    for piece in page.pieces:
        assert_inert_math(piece)


def test_a_streamed_amsmath_block_ends_after_its_last_line():
    # mdit-py-plugins' amsmath rule maps its block one line short; the cut must not fall
    # inside the environment.
    text = "\\begin{align}\na &= b \\\\\nc &= d\n\\end{align}\nAfter.\n\nEnd."
    page = stream(text, every_character(text))
    assert page.finished.count("<math") == 1 and "<p>After.</p>" in page.finished

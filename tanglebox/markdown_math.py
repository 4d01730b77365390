"""Math in Markdown, rendered on the server to MathML (Chromium, Firefox and Safari draw it).

Parsing: mdit-py-plugins' ``dollarmath`` (``$…$`` inline, ``$$…$$`` on its own lines or, with
``double_inline``, inside a paragraph) and ``amsmath`` (top-level ``\\begin{align}…``
environments), plus rules here for ``\\(…\\)`` and ``\\[…\\]`` (on its own lines, or inside a
paragraph), the delimiters models write most. ``$`` next to a digit or a space is not math, so
prices stay text ("$5 or $10").
A ``$$``, ``\\[`` or ``\\begin{…}`` without its closing delimiter is not math at all: while a
reply streams one, it is plain text until the delimiter arrives, and the text after it is
unaffected. A math block never holds a blank line (amsmath's own rule would look for its
``\\end`` through the rest of the text): so a streamed block that starts like math
(a line holding ``MATH_BLOCK_OPENER``) can still become math only until a blank line follows
it, and ``markdown_blocks`` keeps it open until then.

Converting: latex2mathml builds an ElementTree; its output is not trusted (SECURITY.md: the
LaTeX is model or user text). ``\\href`` becomes an ``href`` attribute, ``\\style`` a ``style``
one, and ``\\text{<img …>}`` raw markup in its string form. So the string form is never used:
the element tree is walked and written again with only allow-listed MathML elements and
attributes (attribute values from a narrow alphabet), every text escaped. A formula over
``MAX_FORMULA_CHARS``, nested deeper than ``MAX_BRACE_DEPTH``, or that does not convert is
shown as its source in ``<code class="math-source">``. Conversions are cached: a streaming
reply renders its open paragraph again at every update.

A display formula scrolls sideways in its own box when it is wider than the column: the box is
focusable (``scroll_box``) so that the keyboard scrolls it too.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache
from xml.etree.ElementTree import Element

from latex2mathml.converter import convert_to_element
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from markdown_it.rules_block import StateBlock
from markdown_it.rules_inline import StateInline
from mdit_py_plugins.amsmath import amsmath_block, amsmath_plugin
from mdit_py_plugins.dollarmath import dollarmath_plugin

MAX_FORMULA_CHARS = 2000
MAX_BRACE_DEPTH = 40
MATHML_NAMESPACE = "http://www.w3.org/1998/Math/MathML"
ALLOWED_ELEMENTS = frozenset({
    "math", "mrow", "mi", "mn", "mo", "ms", "mtext", "mspace", "msub", "msup", "msubsup",
    "munder", "mover", "munderover", "mfrac", "msqrt", "mroot", "mtable", "mtr", "mtd",
    "mstyle", "mpadded", "mphantom", "menclose", "mmultiscripts", "mprescripts", "none",
})
ALLOWED_ATTRIBUTES = frozenset({
    "display", "mathvariant", "mathcolor", "mathbackground", "stretchy", "fence", "separator",
    "form", "accent", "accentunder", "lspace", "rspace", "minsize", "maxsize", "movablelimits",
    "largeop", "symmetric", "columnalign", "rowalign", "columnspacing", "rowspacing",
    "columnlines", "rowlines", "frame", "framespacing", "displaystyle", "scriptlevel",
    "linethickness", "notation", "width", "height", "depth", "voffset", "linebreak",
    "columnspan", "rowspan", "bevelled", "equalrows", "equalcolumns",
})
MATH_BLOCK_OPENER = re.compile(r"\$\$|\\\[|\\begin\{")  # anywhere in a line: in a list too
ATTRIBUTE_VALUE = re.compile(r"[A-Za-z0-9 .#%+-]{0,64}")  # words, numbers, lengths, colours


class FormulaError(ValueError):
    """The LaTeX is too long or too deep for a formula."""


def _check_size(latex: str) -> None:
    if len(latex) > MAX_FORMULA_CHARS:
        raise FormulaError("too long")
    depth = 0
    for char in latex:
        depth += (char == "{") - (char == "}")
        if depth > MAX_BRACE_DEPTH:
            raise FormulaError("too deep")


def _local_name(tag: str) -> str:
    namespace, _, name = tag.rpartition("}")
    return name if namespace in ("", "{" + MATHML_NAMESPACE) else ""


def _text(text: str | None) -> str:
    # latex2mathml puts character references ("&#x0002B;") into its texts and unescapes its
    # string form afterwards; decode them here, then escape everything.
    return escapeHtml(html.unescape(text)) if text else ""


def _write(element: Element, out: list[str]) -> None:
    """``element`` as MathML if its name is allowed (dropped with its children if not)."""
    name = _local_name(element.tag)
    if name in ALLOWED_ELEMENTS:
        attributes = "".join(
            f' {key}="{escapeHtml(value)}"' for key, value in element.attrib.items()
            if key in ALLOWED_ATTRIBUTES and ATTRIBUTE_VALUE.fullmatch(value))
        out.append(f"<{name}{attributes}>{_text(element.text)}")
        for child in element:
            _write(child, out)
        out.append(f"</{name}>")
    out.append(_text(element.tail))


def scroll_box(label: str) -> str:
    """The attributes of a box that may scroll sideways (code, a wide table, a display
    formula): focusable, so that the keyboard can scroll it too (WCAG 2.1.1, axe-core's
    scrollable-region-focusable), and a named group, so that focusing it says what it is."""
    return f'tabindex="0" role="group" aria-label="{escapeHtml(label)}"'


def _display(tag: str, kind: str, latex: str) -> str:
    return (f'<{tag} class="math {kind}" {scroll_box("Formula")}>'
            f"{latex_to_mathml(latex.strip(), True)}</{tag}>")


@lru_cache(maxsize=512)  # a 2,000-character formula makes about 28 KB of MathML
def latex_to_mathml(latex: str, display: bool) -> str:
    """Allow-listed MathML for ``latex``, or its source as code when it does not convert."""
    out: list[str] = []
    try:
        _check_size(latex)
        _write(convert_to_element(latex, display="block" if display else "inline"), out)
    except Exception:  # latex2mathml raises its own errors, and RecursionError, on bad input
        return f'<code class="math-source">{escapeHtml(latex)}</code>'
    return "".join(out)


BRACKET_INLINE = {"\\(": ("\\)", "math_inline"), "\\[": ("\\]", "math_inline_double")}


def _bracket_inline(state: StateInline, silent: bool) -> bool:
    """``\\(…\\)``, or ``\\[…\\]`` (display) inside a paragraph (before markdown-it's
    backslash escapes see them)."""
    start = state.pos
    opener = state.src[start:start + 2]
    if opener not in BRACKET_INLINE:
        return False
    closer, token_type = BRACKET_INLINE[opener]
    end = state.src.find(closer, start + 2, state.posMax)
    if end < 0 or not state.src[start + 2:end].strip():
        return False
    if not silent:
        token = state.push(token_type, "math", 0)
        token.content = state.src[start + 2:end]
        token.markup = opener
    state.pos = end + 2
    return True


def _bracket_block(state: StateBlock, start_line: int, end_line: int, silent: bool) -> bool:
    """``\\[`` … ``\\]`` starting a line, closed on it or on a later one (no blank line)."""
    if state.sCount[start_line] - state.blkIndent >= 4:  # an indented code block
        return False
    begin = state.bMarks[start_line] + state.tShift[start_line]
    if not state.src.startswith("\\[", begin):
        return False
    line, first = start_line, begin + 2
    while line < end_line:
        text_start = first if line == start_line else state.bMarks[line] + state.tShift[line]
        text = state.src[text_start:state.eMarks[line]].rstrip()
        if line > start_line and not text:
            return False
        if text.endswith("\\]"):
            break
        line += 1
    else:
        return False
    if not silent:
        content_end = state.src.rfind("\\]", first, state.eMarks[line])
        token = state.push("math_block", "math", 0)
        token.block = True
        token.content = state.src[first:content_end]
        token.markup = "\\["
        token.map = [start_line, line + 1]
    state.line = line + 1
    return True


def _amsmath_without_blank_lines(state: StateBlock, start_line: int, end_line: int,
                                 silent: bool) -> bool:
    line = start_line + 1
    while line < end_line and not state.isEmpty(line):
        line += 1
    if not amsmath_block(state, start_line, line, silent):
        return False
    if not silent:
        # mdit-py-plugins 0.7.0 maps the block to [first line, last line]; markdown-it's maps
        # (and markdown_blocks' cut) end after the last line.
        state.tokens[-1].map = [start_line, state.line]
    return True


def add_math(md: MarkdownIt) -> None:
    """Parse math in ``md`` and render it as allow-listed MathML."""
    dollarmath_plugin(md, allow_labels=False, allow_space=False, allow_digits=False,
                      allow_blank_lines=False, double_inline=True,
                      renderer=lambda latex, options: latex_to_mathml(
                          latex, bool(options["display_mode"])))
    amsmath_plugin(md)
    md.block.ruler.at("amsmath", _amsmath_without_blank_lines,
                      {"alt": ["paragraph", "reference", "blockquote", "list", "footnote_def"]})
    # Display formulas in their own (focusable) scroll boxes; ``$$…$$`` inside a paragraph in a
    # <span>: the plugin's <div> would end the <p> in a browser.
    md.add_render_rule("math_block", lambda self, tokens, idx, options, env: (
        _display("div", "block", tokens[idx].content) + "\n"))
    md.add_render_rule("amsmath", lambda self, tokens, idx, options, env: (
        _display("div", "amsmath", tokens[idx].content) + "\n"))
    md.add_render_rule("math_inline_double", lambda self, tokens, idx, options, env: (
        _display("span", "display", tokens[idx].content)))
    md.inline.ruler.before("escape", "math_inline_bracket", _bracket_inline)
    md.block.ruler.before("fence", "math_block_bracket", _bracket_block,
                          {"alt": ["paragraph", "reference", "blockquote", "list"]})

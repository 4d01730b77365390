"""A streaming reply's Markdown, rendered block by block: a finished block once, the rest again.

A reply arrives as text that only grows. Rendering all of it at every update costs O(n) per
update, and sending it O(n²) bytes over a reply. But Markdown is a sequence of top-level blocks
(paragraphs, headings, lists, fenced code, tables, block quotes), and once a later block has
begun, an earlier one can no longer change. :class:`MarkdownStream` keeps a cut in the text:
before it, blocks already rendered and sent; after it, the *open tail*, which is parsed and
rendered again, whole, at every update. Its guarantee, tested over generated Markdown at every
step of many streams: the finished HTML so far plus the open tail's HTML is exactly
``render_markdown(text so far)``, and at :meth:`MarkdownStream.finish` the finished HTML is
exactly the one-shot rendering of the whole reply.

How a block is known to be finished (markdown-it-py's own block tokens decide, never a regex):

- the tail up to its last line break is parsed (block rules only); each top-level block but
  the last is finished. A top-level block is a level-0 token, or a level-0 opening token with
  everything up to its closing one. The last block stays open: a paragraph can still gain a
  line or become a setext heading or a table header, a list can still gain an item or turn
  loose (a blank line between two items changes every item's HTML), a fence can still close;
- the partial last line never decides: ``#`` alone is an empty heading that ends a paragraph,
  but ``#x`` is more of the paragraph; ``***`` is a rule, ``***x`` is text;
- the cut is placed right after the last finished block, so blank lines and reference
  definitions after it stay in the tail (a definition's title may still arrive on its next
  line);
- a line that may open a math block (``$$``, ``\\[``, ``\\begin{``: ``markdown_math``) may
  still become one when its closing delimiter arrives, swallowing the blocks after it, until a
  blank line follows it (a math block holds none): the block with it stays open until then;
- reference definitions are global: ``[x]: https://…`` turns an earlier ``[x]`` into a link.
  Definitions before the cut are kept and given to every later parse (the first definition of
  a label wins, as in one parse of the whole text). When the definitions a later parse sees
  differ from those the finished blocks were rendered with, the finished part is rendered
  again and, if its HTML changed, the update says so (``replaced``) and carries it all.

Most of a reply's updates come while a paragraph of plain prose is being written (the open
tail is that line, or the paragraph before it, a blank line and that line: the one before stays
open until the next one's line is complete). Such a tail's HTML is known without parsing it
(:func:`plain_prose_html`: a paragraph of escaped text per line, when no character of it could
start an inline or block rule), and nothing in it is finished yet: a story's update costs
about a third of what its parse did. Anything else is parsed.

An open fenced code block is the one block that grows at its end only: inside a fence a whole
line is code for good, and its HTML is the line escaped (a fence is highlighted only once
closed: ``markdown_render``). So while the open tail is one unclosed code block,
:class:`OpenCode` carries its new whole lines once and the line being written again; once its
closing fence arrives, the block, now coloured, is sent whole until the next block begins.

Safety (SECURITY.md, "a payload split across stream chunks"): every HTML string produced here
is the safe renderer's output (``markdown_render``: raw HTML off, links checked) for whole
blocks parsed from their whole text, or a piece of it cut where the renderer's output of an
open code block has its escaped code; no token is ever appended to HTML. A ``<scr`` + ``ipt>``,
a fence opened in one token and closed many tokens later, a ``javascript:`` URL arriving in
pieces: each stays inside the open tail, rendered from its whole text, until its block is done.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml
from markdown_it.token import Token
from markupsafe import Markup

from tanglebox.markdown_math import MATH_BLOCK_OPENER
from tanglebox.markdown_render import CODE_END, WHOLE_MESSAGE, markdown_parser

# markdown-it's own normalization (rules_core/normalize.py): lines end at \r\n, \r or \n.
LINE_END = re.compile(r"\r\n?|\n")


@dataclass(frozen=True)
class OpenCode:
    """The open tail when it is one fenced code block: ``before`` + ``lines`` + ``last_line``
    + ``after`` is its rendering. With ``whole``, all four replace the open tail shown;
    without, ``lines`` (whole lines of code, escaped) go after those already shown, and
    ``last_line`` (the line being written, escaped; None: the same) replaces the last one."""

    lines: Markup
    last_line: Markup | None
    whole: bool = False
    before: Markup = Markup()
    after: Markup = Markup()


@dataclass(frozen=True)
class BlockUpdate:
    """What changed since the last update, as HTML from the safe renderer."""

    finished: Markup  # blocks finished since the last update, to go after those already shown
    open: Markup | None  # the open tail rendered whole, to replace the last one; None: the same
    replaced: bool = False  # the finished HTML changed: ``finished`` is all of it, from the top
    code: OpenCode | None = None  # instead of ``open``: the open tail is a code block


@dataclass(frozen=True)
class Block:
    start: int  # index of its first token
    end: int  # index after its last token
    lines: tuple[int, int]  # markdown-it's map: its first line, the line after its last


def top_level_blocks(tokens: list[Token]) -> list[Block]:
    """The level-0 blocks of a token stream (a paragraph is its open, inline and close)."""
    blocks: list[Block] = []
    start = 0
    for index, token in enumerate(tokens):
        if token.level != 0:
            continue
        if token.nesting == 1:
            start = index
        elif token.nesting == 0:  # fence, code_block, hr: a block in one token
            blocks.append(Block(index, index + 1, _lines(token)))
        else:
            blocks.append(Block(start, index + 1, _lines(tokens[start])))
    return blocks


def _lines(token: Token) -> tuple[int, int]:
    return (token.map[0], token.map[1]) if token.map else (0, 0)


# Characters that are no line break, no tab, no control or format character and no space but
# the plain one: with none of the parser's inline terminators either, a line of them is text.
NOT_PLAIN = re.compile(r"[^\S ]|[\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202e"
                       r"\u2060-\u206f\ufeff\ufff9-\ufffb]")


# Inline terminators that begin no inline rule of this parser (typographer and linkify are
# off), so a line may hold them: its hyphens and colons are text.
TEXT_TERMINATORS = "-:"


def plain_prose_html(tail: str, parser: MarkdownIt) -> str | None:
    """The open tail's HTML, without parsing it, when it is plain prose (what it is for most
    of a reply), else None. Plain prose: after blank lines or none, one line, or one line, a
    blank line and the next line still being written (the paragraph before stays open until
    the next one's line is complete: ``_split``). markdown-it makes each such line a paragraph
    of one text token, the line stripped and escaped, so that is what this returns, without
    the parse and the split (most of an update's CPU). A plain line has no character that may
    start an inline rule of this parser (``terminator_re`` but ``TEXT_TERMINATORS``:
    emphasis, links, code, math, entities, escapes, autolinks...), no control, format or
    unusual space character (which the parser normalizes or trims), and begins with a letter
    or an opening quote or bracket (no block rule starts a line with one: no list item,
    heading, quote, fence, rule, table, indented code, reference or math block). Tested
    against the parser at every step of generated streams (tests/unit/test_markdown_blocks.py).
    """
    first, newline, after = tail.lstrip("\n").partition("\n")
    lines = [first]
    if newline and after:
        second = after.lstrip("\n")
        if second == after or "\n" in second:  # one paragraph of two lines, or a finished one
            return None
        if second:
            lines.append(second)
    if not all(_plain_line(line, parser) for line in lines):
        return None
    return "".join(f"<p>{escapeHtml(line.rstrip(' '))}</p>\n" for line in lines)


def _plain_line(line: str, parser: MarkdownIt) -> bool:
    return bool(line) and (line[0].isalpha() or line[0] in "\"'(\u201c\u2018") \
        and not NOT_PLAIN.search(line) and all(
            found.group() in TEXT_TERMINATORS
            for found in parser.inline.terminator_re.finditer(line))


def line_offset(text: str, line: int) -> int:
    """Where line number ``line`` (from 0) starts in ``text``."""
    if line <= 0:
        return 0
    for count, match in enumerate(LINE_END.finditer(text), start=1):
        if count == line:
            return match.end()
    return len(text)


def complete_lines_end(text: str) -> int:
    """The end of the last whole line: a trailing \\r may still become \\r\\n."""
    return max(text.rfind("\n"), text.rfind("\r", 0, len(text) - 1)) + 1


def _references(env: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {label: (ref["href"], ref["title"])
            for label, ref in env.get("references", {}).items()}


def _before_open_math(finished: list[tuple[int, int]],
                      lines: list[str]) -> list[tuple[int, int]]:
    """The finished blocks before the first that holds a math opener with no blank line after
    it: a closing delimiter may still come and make it (and what follows) one math block."""
    blank = [line for line, text in enumerate(lines) if not text.strip(" \t")]
    last_blank = blank[-1] if blank else -1
    for count, (first, end) in enumerate(finished):
        if any(MATH_BLOCK_OPENER.search(lines[line]) for line in range(max(first, last_blank),
                                                                       end)):
            return finished[:count]
    return finished


@dataclass
class MarkdownStream:
    """One reply's Markdown as it grows: ``update`` at each render, ``finish`` at the end."""

    parser: MarkdownIt = field(default_factory=markdown_parser)

    def __post_init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cut = 0  # where the open tail starts in the text
        self._finished_text = ""  # the text before the cut
        self._finished_html: list[str] = []
        self._frozen: dict[str, Any] = {}  # reference definitions before the cut
        self._rendered_with: dict[str, tuple[str, str]] = {}  # what the finished HTML saw
        self._open_html: str | None = ""  # the open tail's HTML at the last update
        self._code: tuple[str, str, str] | None = None  # an open code block: before, lines, last

    @property
    def finished_html(self) -> str:
        """Every finished block's HTML so far, in order."""
        return "".join(self._finished_html)

    def update(self, text: str) -> BlockUpdate:
        """The blocks of ``text`` (the whole reply so far) finished since the last update,
        and its open tail rendered again."""
        return self._advance(text, final=False)

    def finish(self, text: str) -> BlockUpdate:
        """The whole reply is ``text``: every block is finished and the open tail is empty."""
        return self._advance(text, final=True)

    def _advance(self, text: str, final: bool) -> BlockUpdate:
        shown = bool(self._finished_html)
        restarted = not text.startswith(self._finished_text)
        if restarted:  # not a continuation (a final text that differs): start again
            self._reset()
        tail = text[self._cut:]
        env: dict[str, Any] = {"references": dict(self._frozen), WHOLE_MESSAGE: final}
        options, render = self.parser.options, self.parser.renderer.render
        plain = None if final else plain_prose_html(tail, self.parser)
        if plain is not None:  # prose being written: nothing finished yet, nothing to parse
            tokens, split, finished_lines = [], 0, 0
            new_html, open_html = "", plain
        else:
            tokens = self.parser.parse(tail, env)
            if final:
                split, finished_lines = len(tokens), len(tail) + 1  # more lines than there are
            else:
                split, finished_lines = self._split(tokens, tail)
            new_html = render(tokens[:split], options, env)
            open_html = render(tokens[split:], options, env)
        replaced = restarted and shown
        references = _references(env)
        if self._finished_html and references != self._rendered_with:
            again = render(self.parser.parse(self._finished_text,
                                             {"references": dict(env["references"])}),
                           options, env)
            if again != self.finished_html:
                self._finished_html, replaced = [again], True
        self._rendered_with = references
        if split:
            for label, ref in env["references"].items():
                if label not in self._frozen and ref["map"][0] < finished_lines:
                    self._frozen[label] = ref
            self._cut += len(tail) if final else line_offset(tail, finished_lines)
            self._finished_text = text[:self._cut]
            self._finished_html.append(new_html)
        code = None if final or replaced else self._open_code(tokens[split:], open_html, split)
        if code is not None:
            return BlockUpdate(Markup(new_html), None, code=code)
        unchanged = open_html == self._open_html and not replaced
        self._open_html, self._code = open_html, None
        if replaced:
            return BlockUpdate(Markup(self.finished_html), Markup(open_html), replaced=True)
        return BlockUpdate(Markup(new_html), None if unchanged else Markup(open_html))

    def _open_code(self, tokens: list[Token], html: str, split: int) -> OpenCode | None:
        """The open tail as a code block that grows by lines, or None when it is not one.

        Inside a fence, a whole line is code for good (the closing fence is no code), and
        its HTML is the line escaped, so whole lines are sent once and only the line being
        written again. The renderer's own output is split, and only where it ends with the
        block's escaped code."""
        if len(tokens) != 1 or tokens[0].type != "fence":
            return None
        code = escapeHtml(tokens[0].content)
        if not html.endswith(code + CODE_END):
            return None
        before = html[:len(html) - len(code) - len(CODE_END)]
        content = tokens[0].content
        lines, last = content[:content.rfind("\n") + 1], content[content.rfind("\n") + 1:]
        shown = self._code
        self._open_html, self._code = None, (before, lines, last)
        if split or shown is None or shown[0] != before or not lines.startswith(shown[1]):
            return OpenCode(Markup(escapeHtml(lines)), Markup(escapeHtml(last)), whole=True,
                            before=Markup(before), after=Markup(CODE_END))
        return OpenCode(Markup(escapeHtml(lines[len(shown[1]):])),
                        None if last == shown[2] else Markup(escapeHtml(last)))

    def _split(self, tokens: list[Token], tail: str) -> tuple[int, int]:
        """The token index and line where the tail's finished blocks end (0, 0: none).

        Blocks are decided on the tail's whole lines only; the parse of the whole tail (the
        one rendered) must agree with them, as it always should."""
        complete = tail[:complete_lines_end(tail)]
        if not complete:
            return 0, 0
        block_tokens: list[Token] = []
        source = LINE_END.sub("\n", complete).replace("\0", "\ufffd")
        self.parser.block.parse(source, self.parser, {"references": dict(self._frozen)},
                                block_tokens)
        finished = _before_open_math(
            [block.lines for block in top_level_blocks(block_tokens)[:-1]],
            source.split("\n")[:-1])  # the text after its last line end is no line
        blocks = top_level_blocks(tokens)
        if not finished or [b.lines for b in blocks[:len(finished)]] != finished:
            return 0, 0
        return blocks[len(finished) - 1].end, finished[-1][1]

"""A streaming reply's Markdown, block by block: at every step, the finished blocks sent so far
plus the open tail are exactly the one-shot rendering of the text so far; at the end, the
finished blocks alone are the one-shot rendering of the whole reply. Checked over generated
Markdown cut into random token-sized pieces, and on the payloads SECURITY.md names split over
tokens (every piece of HTML stays inert)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from markdown_it.common.utils import escapeHtml
from markupsafe import Markup

from tanglebox.markdown_blocks import MarkdownStream, plain_prose_html
from tanglebox.markdown_render import render_markdown
from tests.unit.test_markdown_render import assert_inert


@dataclass
class Page:
    """What a page that applied every update shows, and every piece of HTML it was sent."""

    finished: str = ""
    open: str = ""
    code: list[str] = field(default_factory=list)  # an open code block: before, lines, last, after
    pieces: list[str] = field(default_factory=list)
    finished_per_update: list[str] = field(default_factory=list)
    replaced: int = 0


def stream(text: str, cuts: list[int], check_every_step: bool = True) -> Page:
    """Feed ``text`` grown to each cut (then whole), as the UI socket does, checking that the
    page equals the one-shot render at every step."""
    blocks, page = MarkdownStream(), Page()
    for cut in [*sorted(set(cuts)), len(text)]:
        update = blocks.update(text[:cut])
        page.replaced += update.replaced
        page.finished = update.finished if update.replaced else page.finished + update.finished
        page.finished_per_update.append(str(update.finished))
        page.pieces += [update.finished, update.open or ""]
        if update.code is not None:
            code = update.code
            if code.whole:
                page.code = [code.before, code.lines, code.last_line, code.after]
            else:
                page.code[1] += code.lines
                page.code[2] = page.code[2] if code.last_line is None else code.last_line
            page.open = Markup("").join(page.code)
            page.pieces += [code.before, code.lines, code.last_line or "", code.after]
        elif update.open is not None:
            page.open = update.open
        if check_every_step:
            assert page.finished + page.open == render_markdown(text[:cut], whole=False), \
                text[:cut]
    end = blocks.finish(text)
    page.finished = end.finished if end.replaced else page.finished + end.finished
    page.pieces.append(end.finished)
    page.finished_per_update.append(str(end.finished))
    page.open = ""
    assert not end.open
    assert page.finished == render_markdown(text) == blocks.finished_html
    return page


def every_character(text: str) -> list[int]:
    return list(range(1, len(text)))


# -- generated Markdown ---------------------------------------------------------------------

LINE_STARTS = ["", "", "", "# ", "## ", "- ", "* ", "+ ", "1. ", "2) ", "> ", "> - ", "    ",
               "  - ", "```", "```python", "~~~", "| ", "|---|---|", "---", "***", "===", "#",
               "[x]: https://example.com/x", '[y]: https://example.com/y "Y"', "\t", "-", "1."]
WORDS = ["word", "two words", "**bold**", "_it_", "`code`", "[x]", "[link][y]", "[y]",
         "| a | b |", "a | b", "<script>", "</script>", "[a](javascript:alert(1))",
         "https://example.com", "~~gone~~", "&amp;", "\\*", "*", "_", "`", "[", "]", "(", ")"]


@st.composite
def markdown_lines(draw) -> str:
    lines = draw(st.lists(st.tuples(st.sampled_from(LINE_STARTS),
                                    st.lists(st.sampled_from(WORDS), max_size=4)),
                          min_size=1, max_size=14))
    endings = draw(st.lists(st.sampled_from(["\n", "\n", "\n\n", "\r\n", "\r", "  \n"]),
                            min_size=len(lines), max_size=len(lines)))
    return "".join(start + " ".join(words) + end for (start, words), end in zip(lines, endings))


@st.composite
def streamed(draw, texts: st.SearchStrategy[str] | None = None) -> tuple[str, list[int]]:
    """A text (generated Markdown by default) and where it is cut into pieces of 1 to 12
    characters, as tokens come."""
    text = draw(texts if texts is not None else markdown_lines())
    sizes = draw(st.lists(st.integers(1, 12), max_size=len(text)))
    cuts, at = [], 0
    for size in sizes:
        at += size
        if at >= len(text):
            break
        cuts.append(at)
    return text, cuts


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(streamed())
def test_the_page_equals_the_one_shot_render_at_every_step_and_at_the_end(case):
    text, cuts = case
    stream(text, cuts)


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(markdown_lines())
def test_every_character_as_its_own_token(text):
    stream(text, every_character(text))


# -- prose: the open tail rendered without a parse (markdown_blocks.plain_prose_html) -------

PROSE_STARTS = ["", "", "", "", "", "", "", "", "1. ", "2) ", "- ", "+ ", "# ", "> ", "    ",
                " ", "\u201c", '"', "(", "2024 ", "\u00c9mile ", "---", "===", "| ", "```", "$$",
                "\\[", "[x]: "]
PLAIN_WORDS = ["Once", "upon", "a", "time,", "dragon's", '"quoted"', "(aside)", "well-known",
               "note:", "end.", "\u00e9t\u00e9", "\u201ccurly\u201d", "\u2018single\u2019",
               "\U0001f600", "3", "why?"]
# One of these in a line of plain words: each must send it back to the parser, or render as
# the parser would.
RISKY_WORDS = ["1.", "2)", "-", "--", "+", "#", "*", "_", "`", "&", "&amp;", "<b>", ">", "[x]",
               "!", "$5", "\\", "~", "|", "\u00a0", "\t", "\u200b", "a\u00adb", "  ", "http://x.y",
               "=", "@me", "50%", "^", "{", "}", "\u3000", "\u2028", "\r", "\x00", "\\(x\\)"]
ENDINGS = ["\n\n", "\n\n", "\n", "\n\n\n", "  \n", "\r\n"]


@st.composite
def prose_lines(draw) -> str:
    """Lines of plain words, half of them with one risky word somewhere."""
    lines = []
    for _ in range(draw(st.integers(1, 6))):
        words = draw(st.lists(st.sampled_from(PLAIN_WORDS), min_size=1, max_size=5))
        if draw(st.booleans()):
            words.insert(draw(st.integers(0, len(words))), draw(st.sampled_from(RISKY_WORDS)))
        lines.append(draw(st.sampled_from(PROSE_STARTS)) + " ".join(words)
                     + draw(st.sampled_from(ENDINGS)))
    return "".join(lines)


@settings(max_examples=400, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(streamed(prose_lines()))
def test_prose_rendered_without_a_parse_equals_the_one_shot_render_at_every_step(case):
    text, cuts = case
    stream(text, cuts)


def test_a_paragraph_being_written_after_an_open_one_is_rendered_without_a_parse():
    parser = MarkdownStream().parser
    tail = 'Once upon a time, a well-known dragon said: "bake (bread)."\n\nThe end is n'
    assert plain_prose_html(tail, parser) == parser.render(tail) == (
        '<p>Once upon a time, a well-known dragon said: &quot;bake (bread).&quot;</p>\n'
        '<p>The end is n</p>\n')
    for not_plain in ("1. One", "A *b*", "A\nB", "A\n\nB\n", "A &amp; B", "- A", "A\u00a0B"):
        assert plain_prose_html(not_plain, parser) is None, not_plain


# -- what each block costs ------------------------------------------------------------------

REPLY = """## Reading a CSV file

Use the standard library's `csv` module.

1. Open the file.
2. Wrap it in a reader.

```python
import csv
with open("sales.csv") as f:
    print(list(csv.reader(f)))
```

| Option | Meaning |
|---|---|
| `delimiter` | the separator |

That is all."""


def test_each_finished_block_is_sent_once():
    page = stream(REPLY, every_character(REPLY))
    assert page.replaced == 0
    finished = [html for html in page.finished_per_update if html]
    assert "".join(finished) == render_markdown(REPLY)
    assert len(finished) >= 5  # heading, paragraph, list, code and table: each on its own


def test_a_block_is_not_finished_by_a_partial_line():
    # "#" alone is an empty heading that ends a paragraph; "#x" is more of the paragraph.
    blocks = MarkdownStream()
    assert blocks.update("para\n#").finished == ""
    update = blocks.update("para\n#x")
    assert update.finished == "" and update.open == render_markdown("para\n#x", whole=False)


# -- payloads split across tokens (SECURITY.md) ---------------------------------------------

def split_everywhere(text: str) -> Page:
    page = stream(text, every_character(text))
    for piece in page.pieces:
        assert_inert(piece)
    return page


def test_a_script_tag_split_over_deltas_stays_text():
    page = split_everywhere("Look: <scr" + "ipt>alert(1)</scr" + "ipt>\n\nand <img src=x "
                            "onerror=alert(1)>\n\ndone")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.finished


def test_a_javascript_url_arriving_in_pieces_never_becomes_a_link():
    page = split_everywhere("[click](java" + "script:alert(1))\n\n[ok](https://example.com)\n\n"
                            "<javascript:alert(1)>")
    assert page.finished.count("<a ") == 1 and 'href="https://example.com"' in page.finished


def test_a_fence_opened_in_one_token_and_closed_many_tokens_later():
    code = "x = '<b>'\n" * 20
    text = "Before.\n\n```python\n" + code + "```\n\nAfter."
    blocks, finished = MarkdownStream(), []
    for cut in range(1, len(text)):
        update = blocks.update(text[:cut])
        finished.append(str(update.finished))
        for piece in (update.finished, update.open or ""):
            assert_inert(piece)
        if "```\n\nA" not in text[:cut]:  # the fence is not closed yet, or nothing follows
            assert 'class="code-block"' not in "".join(finished)
    end = blocks.finish(text)
    assert blocks.finished_html == render_markdown(text)
    assert "".join(finished).count('class="code-block"') + end.finished.count(
        'class="code-block"') == 1  # sent once, whole
    assert "&lt;b&gt;" in blocks.finished_html


def test_a_list_that_turns_loose_later_is_sent_only_when_it_ends():
    # The blank line before "- c" makes every item a paragraph (<li><p>): "a" and "b" must
    # not have gone out as a tight list.
    text = "- a\n- b\n\n- c\n\nAfter."
    page = stream(text, every_character(text))
    assert "<li>\n<p>a</p>" in page.finished
    assert all("<li>a</li>" not in html for html in page.finished_per_update)


def test_a_table_whose_delimiter_row_comes_later():
    text = "Intro\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nAfter."
    page = stream(text, every_character(text))
    assert all("<p>| a | b |" not in html for html in page.finished_per_update)
    assert "<table>" in page.finished


def test_a_reference_definition_after_its_use_replaces_the_finished_blocks():
    text = "See [the docs][d].\n\nMore text.\n\nAnd more.\n\n[d]: https://example.com/docs\n"
    page = stream(text, every_character(text))
    assert page.replaced >= 1
    assert '<a href="https://example.com/docs"' in page.finished


def test_a_reply_that_is_not_a_continuation_starts_again():
    blocks = MarkdownStream()
    blocks.update("First.\n\nSecond.\n\nThi")
    end = blocks.finish("Other text.")
    assert end.replaced and end.finished == render_markdown("Other text.")


def test_a_definition_in_the_finished_part_still_links_the_blocks_after_it():
    text = "[d]: https://example.com/docs\n\nIntro.\n\nSee [d].\n\nMore.\n\nEnd."
    page = stream(text, every_character(text))
    assert page.replaced == 0
    [see] = [html for html in page.finished_per_update if "See" in html]  # sent once
    assert see.startswith('<p>See <a href="https://example.com/docs"')


def test_an_open_code_block_grows_by_whole_lines_each_sent_once():
    code = "".join(f"x{i} = '<b>{i}'\n" for i in range(30))
    text = "```python\n" + code + "```\n\nAfter."
    blocks, appended, whole = MarkdownStream(), [], 0
    for cut in range(1, len(text)):
        update = blocks.update(text[:cut])
        if update.code is not None:
            whole += update.code.whole
            appended.append(str(update.code.lines))
            for piece in (update.code.lines, update.code.last_line or ""):
                assert "<" not in piece  # escaped text, never markup
    assert whole <= len("```python\n")  # the block's frame, sent again only as its info grows
    assert "".join(appended) == escapeHtml(code)
    assert sum(1 for piece in appended if piece) == 30  # each line once, when it is whole

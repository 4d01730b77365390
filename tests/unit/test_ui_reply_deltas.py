"""The UI socket streams a reply as block deltas: each finished block is sent once, only the
open tail again, and when the reply ends the page's article is exactly the one a reconnect
renders from history. A UI socket driven in-process on the fake backend (``echo`` makes it
say anything), updating at every token; fragments applied as htmx's ws extension would
(tests/reply_page.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.ui_deltas import TOKEN, SteppedRun, WholeReply, markdown_reply, stream_once
from tanglebox.reply_runs import ReplyRuns
from tanglebox.web import ui_reply_watch
from tanglebox.web.ui_fragments import StreamedReply
from tests.reply_page import ReplyPage, element_end, top_level
from tests.unit.test_markdown_blocks import LINE_STARTS, WORDS
from tests.unit.test_ui_conversation import talk

PARAGRAPHS = 30


@pytest.fixture
def settings_values() -> dict:
    return {"maxNewTokens": 2000, "maxNewTokensLimit": 2000}


@pytest.fixture
def every_token(app, monkeypatch):
    """Update at every token: no pacing, and the reply run read by its watcher one event at a
    time (bench.ui_deltas.SteppedRun), so every step of the stream is sent and checked."""
    monkeypatch.setattr(ui_reply_watch, "RENDER_INTERVAL_SECONDS", 0.0)
    monkeypatch.setattr(ui_reply_watch, "RENDER_CPU_SHARE", float("inf"))
    monkeypatch.setattr(ReplyRuns, "run_class", SteppedRun)


def from_history(client) -> str:
    """The reply's article as a page reconnecting after the reply gets it (rendered at once)."""
    [messages] = [m for m in client.reconnect_sync if 'id="messages"' in m]
    start = messages.index('<article id="turn-1-reply"')
    return messages[start:element_end(messages, start)]


def reply_messages(sent: list[str]) -> list[str]:
    """The messages of the first turn after the one that opened it, up to its end."""
    return [m for m in sent[2:] if "turn-1-reply" in m]


def test_each_finished_block_is_sent_once_and_never_again(app, every_token):
    text = "\n\n".join(f"Paragraph {i} of the reply." for i in range(PARAGRAPHS))
    client = talk(app, "page", {"userPrompt": "echo " + text})
    messages = reply_messages(client.sent)
    assert len(messages) > PARAGRAPHS  # it streamed in many updates
    for i in range(PARAGRAPHS):
        finished = [n for n, m in enumerate(messages)
                    for oob, outer in top_level(m)
                    if oob == "beforebegin:#turn-1-reply-open" and f"Paragraph {i} " in outer]
        assert len(finished) == 1, f"paragraph {i} was sent as finished {len(finished)} times"
        later = [m for m in messages[finished[0] + 1:] if f"Paragraph {i} " in m]
        assert later == [], f"paragraph {i} was sent again after it was finished"
    page = ReplyPage().apply_all(client.sent)
    assert not page.streaming
    assert page.html == from_history(client)


def test_an_open_code_block_is_sent_line_by_line(app, every_token):
    code = "".join(f"print({i})  # <tag>\n" for i in range(20))
    client = talk(app, "page",
                  {"userPrompt": "echo Intro.\n\n```python\n" + code + "```\n\nAfter."})
    messages = reply_messages(client.sent)
    for i in range(20):
        appended = [outer for m in messages for oob, outer in top_level(m)
                    if oob == "beforebegin:#turn-1-reply-open-line" and f"print({i})" in outer]
        assert len(appended) == 1, f"line {i} was appended {len(appended)} times"
        assert f"print({i})  # &lt;tag&gt;" in appended[0]
    page = ReplyPage().apply_all(client.sent)
    assert page.html == from_history(client)


def test_the_open_tail_is_rendered_again_whole_never_appended(app, every_token):
    client = talk(app, "page", {"userPrompt": "echo A **bold** claim [and](https://example.com)"})
    opens = [outer for m in reply_messages(client.sent) for oob, outer in top_level(m)
             if oob == "true" and 'id="turn-1-reply-open"' in outer]
    assert len(opens) > 10
    assert any("<strong>bold</strong>" in outer for outer in opens)
    for outer in opens:  # an unfinished "**bo" is text, never a dangling tag
        assert outer.count("<strong>") == outer.count("</strong>")
        assert outer.count("<a ") == outer.count("</a>")


def test_a_reply_cut_at_the_limit_ends_with_its_note_as_history_renders_it(app):
    # maxNewTokens 40: the reply ends at the limit, with a note.
    client = talk(app, "page",
                  {"action": "settings", "temperature": "0", "maxNewTokens": "40",
                   "systemPrompt": ""},
                  {"userPrompt": "echo # Title\n\nOne paragraph.\n\n- a list\n- that goes on"})
    page = ReplyPage().apply_all(client.sent)
    assert re.search(r'<p class="message__note">Stopped at the limit of 40 new tokens', page.html)
    assert page.html == from_history(client)


@st.composite
def markdown_replies(draw) -> str:
    lines = draw(st.lists(st.tuples(st.sampled_from(LINE_STARTS),
                                    st.lists(st.sampled_from(WORDS), max_size=4)),
                          min_size=1, max_size=10))
    text = "".join(start + " ".join(words) + draw(st.sampled_from(["\n", "\n\n"]))
                   for start, words in lines)
    return text.strip() or "x"


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(text=markdown_replies())
def test_after_streaming_the_page_shows_what_a_reconnect_renders(app, every_token, text):
    client = talk(app, "page", {"userPrompt": "echo " + text})
    page = ReplyPage().apply_all(client.sent)
    assert not page.streaming
    assert page.html == from_history(client)


def test_the_benchmark_measures_fewer_bytes_and_updates_the_same_page(app):
    # bench.ui_deltas drives this socket code; deltas must cost less than the whole reply.
    tokens = TOKEN.findall(markdown_reply(300))
    whole = stream_once(app, WholeReply, tokens, rate=50, streams=1)
    deltas = stream_once(app, StreamedReply, tokens, rate=50, streams=1)
    assert deltas.final_html == whole.final_html
    assert deltas.reply_bytes < whole.reply_bytes / 2

"""The serving benchmark's UI client reads the real fragments the UI socket sends."""

from __future__ import annotations

from bench.clients import REPLY_WITH_TEXT, _reply_content
from tanglebox.web.ui_conversation import Turn
from tanglebox.web.ui_fragments import new_turn_fragment, reply_fragment


def test_only_fragments_that_show_reply_text_count_as_chunks(app):
    turn = Turn(id=3, prompt="Tell me a story.")
    with app.app_context():
        person = new_turn_fragment(turn)
        typing = reply_fragment(turn, "", streaming=True)
        partial = reply_fragment(turn, "Once upon", streaming=True)
        final = reply_fragment(turn, "Once upon a **time**.", streaming=False)
    assert not REPLY_WITH_TEXT.match(person)
    assert not REPLY_WITH_TEXT.match(typing)
    assert REPLY_WITH_TEXT.match(partial) and REPLY_WITH_TEXT.match(final)
    assert _reply_content(partial) == "Once upon"
    assert _reply_content(final) == "Once upon a time."

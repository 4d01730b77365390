"""The serving benchmark's UI client reads the real fragments the UI socket sends."""

from __future__ import annotations

from bench.clients import REPLY_WITH_TEXT, _reply_content
from tanglebox.web.ui_conversation import Turn
from tanglebox.web.ui_fragments import StreamedReply, new_turn_fragment, reply_fragment


def test_only_fragments_that_show_reply_text_count_as_chunks(app):
    turn = Turn(id=3, prompt="Tell me a story.")
    with app.app_context():
        person = new_turn_fragment(turn)
        typing = reply_fragment(turn, "", streaming=True)
        stream = StreamedReply(turn)
        partial = stream.update("Once upon")
        more = stream.update("Once upon a time.\n\nThe\n\n")
        end = stream.end("Once upon a time.\n\nThe end.", note="")
        again = reply_fragment(turn, "Once upon a **time**.", streaming=False)
    assert not REPLY_WITH_TEXT.match(person)
    assert not REPLY_WITH_TEXT.match(typing)
    assert all(REPLY_WITH_TEXT.match(shown) for shown in (partial, more, end, again))
    assert _reply_content([partial, more, end]).split("\n") == ["Once upon a time.", "The end."]
    assert _reply_content([partial, again]) == "Once upon a time."

"""Replies owned by the server, through the chat UI's socket on a live server (gunicorn +
gevent, the fake backend, the conversations in SQLite beside settings.json): a reply goes on
when its socket closes and a socket that comes back shows it so far, then the rest; Stop from
another socket; a restart (drained) or a crash (SIGKILL) mid-reply keeps the text saved,
"Interrupted"; regenerate and edit keep alternatives to flip between; settings are stored; a
conversation is its browser's alone."""

from __future__ import annotations

import os
import signal
from contextlib import closing

import pytest

from tests.integration.test_ui_socket import (
    OTHER_BROWSER,
    ChatClient,
    composer_is_busy,
    element,
    flip_count,
    parse,
    shown_text,
    stored_id,
    targets,
)
from tests.live_server import LiveServer, wait_until_idle
from tests.reply_page import ReplyPage

COUNT_300 = " ".join(str(i) for i in range(1, 301))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = LiveServer(tmp_path_factory.mktemp("ui-replies"))
    server.start(fake={"step_delay": 0.01}, maxNewTokens=3000, maxNewTokensLimit=3000)
    yield server
    server.stop()


def start_reply(server: LiveServer, prompt: str) -> tuple[ChatClient, str, list[str]]:
    """A socket that sent ``prompt`` and has seen some of the reply: (it, the stored id, the
    messages of the turn so far)."""
    chat = ChatClient(server)
    chat.send(userPrompt=prompt)
    first = chat.receive()
    return chat, stored_id(first), [first, chat.receive()]


def watch_to_the_end(client: ChatClient) -> list[str]:
    """A socket that connected mid-reply: the sync's turn, then every update to the end."""
    return [client.sync, *client.receive_until_composer_enabled()]


def test_a_closed_socket_leaves_the_reply_going_and_a_reconnect_shows_it_whole(server):
    chat, conversation, seen = start_reply(server, "count 300")
    so_far = shown_text(seen)
    chat.close()
    with closing(ChatClient(server, conversation=conversation)) as again:
        assert composer_is_busy(again.sync)  # still being written
        assert element(again.sync, "turn-1-reply").find("#turn-1-reply-open") is not None
        messages = watch_to_the_end(again)
    page = ReplyPage().apply_all(messages)  # the page as htmx builds it from the fragments
    assert page.text() == COUNT_300  # no gap, no repeat
    assert COUNT_300.startswith(so_far) and len(so_far) < len(COUNT_300)
    with closing(ChatClient(server, conversation=conversation)) as later:
        assert element(later.sync, "turn-1-reply").find(".message__content").text() == COUNT_300


def test_stop_from_another_socket_ends_the_reply_on_both(server):
    chat, conversation, seen = start_reply(server, "count 2000")
    with closing(chat), closing(ChatClient(server, conversation=conversation)) as other:
        assert composer_is_busy(other.sync)
        other.send(action="stop")
        theirs = [other.sync, *other.receive_until_composer_enabled()]
        mine = seen + chat.receive_until_composer_enabled()
    for messages in (mine, theirs):
        reply = parse(ReplyPage().apply_all(messages).html)[0]
        assert reply.find(".message__note").text() == "Stopped."
    assert shown_text(mine) == shown_text(theirs)  # the same reply, as far as it was written
    assert len(shown_text(mine)) < 1000
    wait_until_idle(server)


def test_regenerate_keeps_the_old_reply_and_select_flips_between_them(server):
    with closing(ChatClient(server)) as chat:
        chat.ask("echo flip")
        chat.send(action="regenerate")
        end = chat.receive_until_composer_enabled()[-1]
        assert flip_count(end, "reply") == "2/2"
        previous = element(end, "turn-1").find(".flipper").find_all("button")[0]
        chat.send(action="select", message=previous.attrs["value"])
        selected = chat.receive()
        assert targets(selected) == ["#messages", "#composer", "#chat-error"]
        assert flip_count(selected, "reply") == "1/2"
        following = element(selected, "turn-1").find(".flipper").find_all("button")[1]
        chat.send(action="select", message=following.attrs["value"])
        assert flip_count(chat.receive(), "reply") == "2/2"
        chat.send(action="select", message="999999")  # not one it was offered
        assert "not part of this conversation" in element(chat.receive(), "chat-error").text()


def test_editing_the_last_message_keeps_the_old_one_as_an_alternative(server):
    with closing(ChatClient(server)) as chat:
        first = chat.ask("echo one")[0]
        chat.ask("echo two")
        chat.send(action="edit", userPrompt="echo deux")
        messages = chat.receive_until_composer_enabled()
        assert targets(messages[0]) == ["#turn-2", "#composer", "#chat-error"]
        assert shown_text(messages, turn=2) == "deux"
        assert flip_count(messages[-1], "message") == "2/2"
    with closing(ChatClient(server, conversation=stored_id(first))) as again:
        turn = element(again.sync, "turn-2")
        assert turn.find("#turn-2-prompt").find(".message__content").text() == "echo deux"
        assert element(again.sync, "turn-1-reply").find(".message__content").text() == "one"


def test_a_conversation_is_never_shown_to_another_browser(server):
    with closing(ChatClient(server)) as chat:
        conversation = stored_id(chat.ask("echo my secret")[0])
    with closing(ChatClient(server, conversation=conversation,
                            browser=OTHER_BROWSER)) as other:
        assert element(other.sync, "messages").find(".turn") is None
        assert "my secret" not in other.sync
        assert element(other.sync, "messages").attrs["data-conversation-url"] == "/"


SETTINGS = {"fake": {"step_delay": 0.01}, "maxNewTokens": 3000, "maxNewTokensLimit": 3000}
COUNT_2000 = " ".join(str(i) for i in range(1, 2001))


def interrupted_after_restart(server: LiveServer, conversation: str) -> str:
    """Start the server again: the reply is shown ended, "Interrupted"; its text."""
    server.start(**SETTINGS)
    with closing(ChatClient(server, conversation=conversation)) as again:
        assert not composer_is_busy(again.sync)
        reply = element(again.sync, "turn-1-reply")
        assert reply.find(".message__note").text() == "Interrupted"
        text = reply.find(".message__content").text()
    assert text and COUNT_2000.startswith(text)
    return text


def test_a_restart_mid_reply_keeps_its_text_marked_interrupted(fake_server):
    chat, conversation, seen = start_reply(fake_server.start(**SETTINGS), "count 2000")
    so_far = shown_text(seen)
    fake_server.stop()  # SIGTERM: the engine drains, the reply ends "shutdown"
    chat.close()
    assert interrupted_after_restart(fake_server, conversation).startswith(so_far)


def test_a_crash_mid_reply_keeps_what_was_saved_marked_interrupted(fake_server):
    chat, conversation, seen = start_reply(fake_server.start(**SETTINGS), "count 2000")
    # Long enough that the text was saved at least once (every SAVE_INTERVAL_SECONDS).
    while len(shown_text(seen)) < 300:
        seen.append(chat.receive())
    os.killpg(fake_server.process.pid, signal.SIGKILL)  # no drain: the process is gone
    fake_server.process.wait()
    chat.close()
    interrupted_after_restart(fake_server, conversation)


def test_settings_changed_in_a_stored_conversation_are_kept(server):
    with closing(ChatClient(server)) as chat:
        conversation = stored_id(chat.ask("echo hi")[0])
        chat.send(action="settings", temperature="0.3", maxNewTokens="9", systemPrompt="Terse.")
        assert "Applied" in element(chat.receive(), "settings-status").text()
    with closing(ChatClient(server, conversation=conversation)) as again:
        assert element(again.sync, "temperature").attrs["value"] == "0.3"
        assert element(again.sync, "max-new-tokens").attrs["value"] == "9"
        assert element(again.sync, "system-prompt").text() == "Terse."

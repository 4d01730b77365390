"""The UI's conversations: the bridge from the store (page ids, turns), and what a conversation's
settings send to the model (a UI socket driven in-process with a scripted client, on the app's
own SQLite database)."""

from __future__ import annotations

import json

import pytest
from simple_websocket import ConnectionClosed

from tanglebox.conversation_store import conversation_store
from tanglebox.web.ui_conversation import (
    PAGE,
    WIDGET,
    ChatSettings,
    Conversation,
    PageConversations,
    UiChats,
    new_conversation,
    page_conversations,
    reply_runs,
)
from tanglebox.web.ui_socket import RENDER_PACER, ChatSocket
from tests.fake_backend import SPECIALS
from tests.live_server import wait_until
from tests.reply_page import ReplyPage

SPECIAL_NAMES = {token: name for name, token in SPECIALS.items()}


# -- the branch as turns ---------------------------------------------------------------------

def make(conversation_id: str) -> Conversation:
    return Conversation(conversation_id, PAGE, ChatSettings(0.7, 64, ""))


def test_history_alternates_user_and_assistant_up_to_a_turn():
    conversation = make("d" * 20)
    first, second = conversation.add_turn("one"), conversation.add_turn("two")
    first.reply, second.reply = "1", "2"
    assert [m.content for m in conversation.history()] == ["one", "1", "two", "2"]
    assert [m.content for m in conversation.history(before=second)] == ["one", "1"]


def test_a_page_id_means_the_conversation_its_first_message_stored_until_new_chat():
    pages = PageConversations(limit=2)
    assert pages.resolve("me", "page-a") == "page-a"  # nothing stored: the id as given
    pages.remember("me", "page-a", "stored-1")
    assert pages.resolve("me", "page-a") == "stored-1"
    assert pages.resolve("someone else", "page-a") == "page-a"  # per browser
    pages.remember("me", "page-a", None)  # New chat
    assert pages.resolve("me", "page-a") is None
    pages.remember("me", "page-b", "stored-2")
    pages.remember("me", "page-c", "stored-3")
    assert pages.resolve("me", "page-a") == "page-a"  # the oldest was forgotten


def chats_for(app, page_id: str, owner: str = "me", page_named: bool = False) -> UiChats:
    store = conversation_store(app)
    runtime = app.extensions["tanglebox"]
    return UiChats(store, reply_runs(app, store), page_conversations(app), owner, PAGE, "",
                   runtime.settings, page_id, page_named)


def test_a_socket_opens_its_browsers_stored_conversation_or_where_its_page_moved(app):
    store = conversation_store(app)
    stored = store.create("me", PAGE, "", {})
    store.add_message(stored.id, None, "user", "hello")
    new_page = "r" * 22  # a page opened at /: a random id, nothing stored under it
    assert not chats_for(app, new_page).open(new_page).stored
    page_conversations(app).remember("me", new_page, stored.id)  # its first message
    opened = chats_for(app, new_page).open(new_page)
    assert opened.stored and opened.id == stored.id and opened.turns[0].prompt == "hello"
    assert opened.url == f"/c/{stored.id}"
    # Another browser never gets it: not by its id, not through a page id.
    assert not chats_for(app, stored.id, owner="not me").open(stored.id).stored
    assert not chats_for(app, new_page, owner="not me").open(new_page).stored


def test_a_page_at_c_id_shows_that_conversation_unless_the_page_itself_moved_on(app):
    store = conversation_store(app)
    stored = store.create("me", PAGE, "", {})
    store.add_message(stored.id, None, "user", "hello")
    page_conversations(app).remember("me", stored.id, None)  # New chat on an older page
    opened = chats_for(app, stored.id).open(stored.id)  # opened again: shown
    assert opened.stored and opened.turns[0].prompt == "hello"
    page = "p" * 22
    page_conversations(app).remember("me", page, None)  # this page load pressed New chat
    assert not chats_for(app, page, page_named=True).open(stored.id).stored


# -- what reaches the model ------------------------------------------------------------------

class ScriptedClient:
    """Stands in for simple-websocket's Server: scripted messages in, fragments recorded."""

    connected = True
    input_buffer: list[str] = []  # what arrived while a reply streams: here, nothing

    def __init__(self, *messages: dict) -> None:
        self.incoming = [json.dumps({**m, "HEADERS": {"HX-Request": "true"}}) for m in messages]
        self.sent: list[str] = []
        self.reconnect_sync: list[str] = []

    def receive(self, timeout=None):
        if timeout == 0:
            return None  # a reply is streaming: the next message waits until it is done
        if self.incoming:
            return self.incoming.pop(0)
        raise ConnectionClosed(1000, "the script is over")

    def send(self, data: str) -> None:
        self.sent.append(data)

    def close(self, reason=None, message=None) -> None:
        raise AssertionError("the socket should not close by itself here")


def talk(app, surface: str, *messages: dict) -> ScriptedClient:
    runtime = app.extensions["tanglebox"]
    client = ScriptedClient(*messages)
    conversation = new_conversation("e" * 22, surface, runtime.settings)
    with app.test_request_context("/ws/chat"):
        with pytest.raises(ConnectionClosed):
            ChatSocket(client, runtime, conversation, "test").run()
        # What a page reconnecting to this conversation now gets (once its reply has ended).
        runs = app.extensions.get("tanglebox.reply_runs")
        wait_until(lambda: not runs or not len(runs), what="the reply's end")
        client.reconnect_sync = ChatSocket(ScriptedClient(), runtime, conversation, "test")._sync()
    return client


def model_prompts(backend) -> list[str]:
    return ["".join(SPECIAL_NAMES.get(t) or chr(t) for t in sequence)
            for sequence in backend.sequences if sequence]


@pytest.mark.parametrize("settings_values", [{"widgetSystemPrompt": "Answer about Tanglebox."}])
def test_the_widget_sends_the_widget_system_prompt(app, fake_backend):
    client = talk(app, WIDGET, {"userPrompt": "echo hi"})
    assert ReplyPage().apply_all(client.sent).text() == "hi"
    [prompt] = model_prompts(fake_backend)
    assert prompt.startswith("<|system|>Answer about Tanglebox.<|end|><|user|>echo hi<|end|>")


@pytest.mark.parametrize("settings_values", [{"systemPrompt": "Answer in French."}])
def test_the_servers_system_prompt_reaches_the_model(app, fake_backend):
    talk(app, PAGE, {"userPrompt": "echo hi"})
    [prompt] = model_prompts(fake_backend)
    assert prompt.startswith("<|system|>Answer in French.<|end|><|user|>echo hi<|end|>")


@pytest.mark.parametrize("settings_values", [{"widgetSystemPrompt": "Answer about Tanglebox."}])
def test_the_page_does_not_use_the_widget_system_prompt(app, fake_backend):
    talk(app, PAGE, {"userPrompt": "echo hi"})
    [prompt] = model_prompts(fake_backend)
    assert "Tanglebox" not in prompt and prompt.startswith("<|user|>echo hi")


def test_the_settings_panel_sets_this_conversations_system_prompt(app, fake_backend):
    talk(app, PAGE,
         {"action": "settings", "temperature": "0", "maxNewTokens": "50",
          "systemPrompt": "You are terse."},
         {"userPrompt": "echo one"}, {"userPrompt": "echo two"})
    prompts = model_prompts(fake_backend)
    assert any(p.startswith("<|system|>You are terse.<|end|><|user|>echo one<|end|>"
                            "<|assistant|>one<|end|><|user|>echo two") for p in prompts)


def test_a_turn_sends_fragments_in_the_documented_order(app):
    client = talk(app, PAGE, {"userPrompt": "echo ok"})
    sync, first, *updates, last = client.sent
    assert 'id="messages" ' in sync and 'id="messages" ' in first  # a conversation's first
    assert all('id="turn-1-reply-open"' in update for update in updates)
    assert '<div id="turn-1-reply-open" hx-swap-oob="delete">' in last
    assert 'id="composer"' in last


def test_a_finished_reply_leaves_the_render_budget_to_the_others(app):
    before = RENDER_PACER.streaming
    talk(app, PAGE, {"userPrompt": "count 5"}, {"userPrompt": "echo again"})
    assert RENDER_PACER.streaming == before


def test_a_turn_renders_its_own_markdown_not_the_whole_conversations_again(app, monkeypatch):
    from tanglebox.web import ui_fragments
    rendered: list[str] = []
    real_render_turn = ui_fragments.render_turn

    def render_turn(turn, streaming=False):
        rendered.append(turn.prompt)
        return real_render_turn(turn, streaming)

    monkeypatch.setattr(ui_fragments, "render_turn", render_turn)
    client = talk(app, PAGE, *({"userPrompt": f"echo {n}"} for n in range(6)))
    assert sum('id="composer"' in fragment for fragment in client.sent) >= 12
    # The first message shows the conversation it began (one turn); the page coming back at
    # the end shows all six. Nothing else renders a whole turn again: the composer shown
    # busy and then free at each turn used to render every turn so far (quadratic work).
    assert rendered == ["echo 0"] + [f"echo {n}" for n in range(6)]

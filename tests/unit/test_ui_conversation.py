"""The UI's conversations: the store that keeps them between sockets, and what a conversation's
settings send to the model (a UI socket driven in-process with a scripted client)."""

from __future__ import annotations

import json

import pytest
from simple_websocket import ConnectionClosed

from tanglebox.web.ui_conversation import (
    PAGE,
    WIDGET,
    ChatSettings,
    Conversation,
    ConversationStore,
    conversation_store,
    new_conversation,
)
from tanglebox.web.ui_socket import RENDER_PACER, ChatSocket
from tests.fake_backend import SPECIALS
from tests.reply_page import ReplyPage

SPECIAL_NAMES = {token: name for name, token in SPECIALS.items()}


# -- the store -------------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(conversation_id: str) -> Conversation:
    return Conversation(conversation_id, PAGE, ChatSettings(0.7, 64, ""))


def test_a_known_id_gets_its_conversation_back():
    store = ConversationStore()
    first = store.attach("a" * 22, make)
    first.add_turn("hello")
    store.detach(first)
    assert store.attach("a" * 22, make) is first


@pytest.mark.parametrize("conversation_id", [None, "", "short", "bad id with spaces!!!!",
                                             "x" * 65])
def test_a_missing_or_malformed_id_gets_a_fresh_conversation(conversation_id):
    store = ConversationStore()
    conversation = store.attach(conversation_id, make)
    assert conversation.id != conversation_id and len(conversation.id) >= 16


def test_a_detached_conversation_expires_after_the_ttl():
    clock = Clock()
    store = ConversationStore(ttl=60, clock=clock)
    conversation = store.attach("b" * 22, make)
    store.detach(conversation)
    clock.now += 59
    assert store.attach("b" * 22, make) is conversation  # attached again: it does not expire
    clock.now += 600
    assert len(store) == 1
    store.detach(conversation)
    clock.now += 61
    assert store.attach("b" * 22, make) is not conversation


def test_only_so_many_detached_conversations_are_kept_the_oldest_go_first():
    store = ConversationStore(max_detached=2)
    conversations = [store.attach(f"{i}" * 20, make) for i in range(3)]
    for conversation in conversations:
        store.detach(conversation)
    assert len(store) == 2
    assert store.attach("0" * 20, make) is not conversations[0]
    assert store.attach("2" * 20, make) is conversations[2]


def test_an_attached_conversation_is_never_dropped():
    store = ConversationStore(max_detached=0, ttl=0)
    attached = store.attach("c" * 20, make)
    for i in range(5):
        store.detach(store.attach(f"{i}" * 20, make))
    assert store.attach("c" * 20, make) is attached


def test_each_app_has_its_own_store(app):
    assert conversation_store(app) is conversation_store(app)
    assert isinstance(conversation_store(app), ConversationStore)


def test_history_alternates_user_and_assistant_up_to_a_turn():
    conversation = make("d" * 20)
    first, second = conversation.add_turn("one"), conversation.add_turn("two")
    first.reply, second.reply = "1", "2"
    assert [m.content for m in conversation.history()] == ["one", "1", "two", "2"]
    assert [m.content for m in conversation.history(before=second)] == ["one", "1"]


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
        # What a page reconnecting to this conversation now gets.
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
    assert 'id="messages" ' in sync and 'hx-swap-oob="beforeend:#messages"' in first
    assert all('id="turn-1-reply-open"' in update for update in updates)
    assert '<div id="turn-1-reply-open" hx-swap-oob="delete">' in last
    assert 'id="composer"' in last


def test_a_finished_reply_leaves_the_render_budget_to_the_others(app):
    before = RENDER_PACER.streaming
    talk(app, PAGE, {"userPrompt": "count 5"}, {"userPrompt": "echo again"})
    assert RENDER_PACER.streaming == before

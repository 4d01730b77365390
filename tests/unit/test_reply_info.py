"""Under each reply, from what the server stored with it (issue 18): its speed, Copy (the
Markdown source), "Show prompt" (the exact text the model read), and the context meter beside
the composer. A UI socket driven in-process with a scripted client, on the app's own SQLite
database, and the routes the page fetches from."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from simple_websocket import ConnectionClosed

from tanglebox.conversation_store import conversation_store
from tanglebox.web.reply_info import ContextMeter, fewest_to_drop, reply_info
from tanglebox.web import ui_sending
from tanglebox.web.ui_conversation import PAGE, new_conversation
from tanglebox.web.ui_socket import ChatSocket
from tests.fake_backend import FakeBackend
from tests.live_server import wait_until
from tests.unit.test_remote_engine import ask, final, make_engine, upstream  # noqa: F401
from tests.unit.test_ui_conversation import ScriptedClient, model_prompts

COOKIE = "B" * 43  # a browser's cookie value (browser_identity.COOKIE_VALUE)
OWNER = hashlib.sha256(COOKIE.encode("ascii")).hexdigest()
HEADERS = {"Cookie": f"tanglebox_browser={COOKIE}"}


def talk_as_browser(app, *messages: dict) -> tuple[ScriptedClient, str]:
    """A page of the browser with COOKIE sends ``messages``; its conversation's id."""
    runtime = app.extensions["tanglebox"]
    client = ScriptedClient(*messages)
    conversation = new_conversation("f" * 22, PAGE, runtime.settings)
    with app.test_request_context("/ws/chat", headers=HEADERS):
        socket = ChatSocket(client, runtime, conversation, "test")
        with pytest.raises(ConnectionClosed):
            socket.run()
        runs = app.extensions.get("tanglebox.reply_runs")
        wait_until(lambda: not runs or not len(runs), what="the reply's end")
    return client, socket.conversation.id


def get(app, path: str):
    client = app.test_client()
    client.set_cookie("tanglebox_browser", COOKIE)
    return client.get(path)


def test_a_reply_ends_with_its_speed_copy_and_show_prompt(app):
    client, conversation_id = talk_as_browser(app, {"userPrompt": "echo hi"})
    [reply] = [m for m in conversation_store(app).branch(conversation_id)
               if m.role == "assistant"]
    end = client.sent[-1]
    assert 'id="turn-1-meta"' in end
    assert f'data-copy-markdown="/c/{conversation_id}/messages/{reply.id}.md"' in end
    assert f'data-prompt-url="/c/{conversation_id}/messages/{reply.id}/prompt"' in end
    assert f"{reply.completion_tokens} tokens" in end  # the footer: from the stored counts
    assert "ms to first token" in end
    assert "<dt>Temperature</dt>" in end  # the sampling settings stored with it


def test_show_prompt_is_the_stored_text_the_model_read_escaped(app, fake_backend):
    _, conversation_id = talk_as_browser(app, {"userPrompt": "echo <b>bold</b> & more"})
    [reply] = [m for m in conversation_store(app).branch(conversation_id)
               if m.role == "assistant"]
    read = model_prompts(fake_backend)[0]  # the tokens the model read, then its reply's
    assert read == reply.prompt_text + reply.content and reply.prompt_text
    assert reply.template  # the template it was rendered with
    page = get(app, f"/c/{conversation_id}/messages/{reply.id}/prompt")
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert "echo &lt;b&gt;bold&lt;/b&gt; &amp; more" in html and "<b>" not in html
    assert f": {reply.prompt_tokens} tokens" in html
    assert '<|assistant|>' not in html and "&lt;|assistant|&gt;" in html


def test_copy_reads_the_markdown_source_not_the_html(app):
    _, conversation_id = talk_as_browser(app, {"userPrompt": "echo **strong** `code`"})
    [reply] = [m for m in conversation_store(app).branch(conversation_id)
               if m.role == "assistant"]
    source = get(app, f"/c/{conversation_id}/messages/{reply.id}.md")
    assert source.status_code == 200 and source.mimetype == "text/markdown"
    assert source.get_data(as_text=True) == "**strong** `code`"


def test_another_browser_gets_neither_prompt_nor_source(app):
    _, conversation_id = talk_as_browser(app, {"userPrompt": "echo mine"})
    [reply] = [m for m in conversation_store(app).branch(conversation_id)
               if m.role == "assistant"]
    stranger = app.test_client()
    stranger.set_cookie("tanglebox_browser", "C" * 43)
    for path in (f"/c/{conversation_id}/messages/{reply.id}/prompt",
                 f"/c/{conversation_id}/messages/{reply.id}.md"):
        assert stranger.get(path).status_code == 404


def test_a_reply_stored_without_its_prompt_says_so(app):
    store = conversation_store(app)
    conversation = store.create(OWNER, PAGE, "", {})
    question = store.add_message(conversation.id, None, "user", "old question")
    reply = store.add_message(conversation.id, question.id, "assistant", "old answer")
    html = get(app, f"/c/{conversation.id}/messages/{reply.id}/prompt").get_data(as_text=True)
    assert "The prompt was not stored for this reply." in html


def test_a_remote_models_prompt_is_the_messages_sent_upstream():
    class Stored:  # a StoredMessage's fields, as a remote reply stores them
        id, conversation_id, content, seed = 7, "x" * 22, "hi", None
        prompt_text = '[\n {"role": "user", "content": "hi"}\n]'
        template, model, sampling, timings = "upstream", "remote-one", {}, {}
        prompt_tokens, completion_tokens, cached_tokens = 9, 1, 0
    info = reply_info(Stored())
    assert info.prompt_by_upstream and info.prompt_text.startswith("[")


def meter_of(sent: list[str]) -> str:
    [composer] = [m for m in sent[-1:] if 'id="composer"' in m]
    found = re.search(r'<span id="context-meter".*?</span>\s*</span>', composer, re.S)
    return found.group(0) if found else ""


def test_the_meter_shows_the_conversations_tokens_against_the_context(app):
    client, conversation_id = talk_as_browser(app, {"userPrompt": "echo one"},
                                              {"userPrompt": "echo two"})
    reply = conversation_store(app).branch(conversation_id)[-1]
    tokens = reply.prompt_tokens + reply.completion_tokens
    meter = meter_of(client.sent)
    assert f"{tokens} / 4096 tokens" in meter
    assert "is-warning" not in meter and "may not fit" not in meter


class TestASmallContext:
    @pytest.fixture
    def fake_backend(self) -> FakeBackend:
        return FakeBackend(context_length=64)

    def test_the_meter_warns_when_the_next_turn_would_likely_not_fit(self, app):
        client, _ = talk_as_browser(app, {"userPrompt": "echo " + "x" * 10})
        assert "is-warning" not in meter_of(client.sent)
        client, _ = talk_as_browser(app, {"userPrompt": "echo " + "y" * 25})
        meter = meter_of(client.sent)
        assert "is-warning" in meter and "the next turn may not fit" in meter


def test_a_remote_models_meter_shows_the_tokens_alone():
    assert ContextMeter(120, None).percent is None and not ContextMeter(120, None).warn
    assert ContextMeter(90, 100).warn and not ContextMeter(80, 100).warn


class TestAConversationThatOutgrowsItsContext:
    @pytest.fixture
    def fake_backend(self) -> FakeBackend:
        return FakeBackend(context_length=96)

    def test_a_message_too_long_offers_a_new_chat_or_dropping_the_oldest_turns(self, app):
        long = "echo " + "z" * 40
        client, conversation_id = talk_as_browser(
            app, {"userPrompt": "echo " + "a" * 30}, {"userPrompt": long})
        choice = client.sent[-1]
        assert "Start a new chat with it" in choice
        assert "Continue without the oldest messages" in choice
        assert f'name="userPrompt" value="{long}"' in choice  # the message, kept for either

    def test_continuing_sends_it_without_the_oldest_turns_and_marks_them(self, app,
                                                                          fake_backend):
        client, conversation_id = talk_as_browser(
            app, {"userPrompt": "echo " + "a" * 20}, {"userPrompt": "echo " + "b" * 20},
            {"action": "send-dropping", "userPrompt": "echo " + "c" * 30})
        store = conversation_store(app)
        branch = store.branch(conversation_id)
        assert branch[-2].content == "echo " + "c" * 30  # sent, and answered
        assert branch[-1].content.startswith("ccc")
        last_prompt = branch[-1].prompt_text
        assert "a" * 20 not in last_prompt  # the oldest turn was not sent
        assert last_prompt.count("<|user|>") < 3
        page = get(app, f"/c/{conversation_id}").get_data(as_text=True)
        assert "Earlier messages are not sent to the model" in page
        # the divider sits before the first turn still sent, after the dropped one
        assert page.index("a" * 20) < page.index("Earlier messages are not sent") < \
            page.index("echo " + "c" * 30)

    def test_start_a_new_chat_puts_the_message_in_an_empty_conversation(self, app):
        client, _ = talk_as_browser(app, {"userPrompt": "echo " + "a" * 30},
                                    {"action": "new", "userPrompt": "echo my long text"})
        assert "echo my long text</textarea>" in client.sent[-1]
        assert "turn-1" not in client.sent[-1]


class TestALongerContext:
    @pytest.fixture
    def fake_backend(self) -> FakeBackend:
        return FakeBackend(context_length=160)

    def test_a_guess_too_small_is_retried_with_one_more_turn_left_out(self, app,
                                                                     monkeypatch):
        monkeypatch.setattr(ui_sending, "fewest_to_drop", lambda sent, context, prompt: 1)
        client, conversation_id = talk_as_browser(
            app, {"userPrompt": "echo " + "a" * 15}, {"userPrompt": "echo " + "b" * 15},
            {"userPrompt": "echo " + "d" * 15},
            {"action": "send-dropping", "userPrompt": "echo " + "c" * 80})
        branch = conversation_store(app).branch(conversation_id)
        assert branch[-2].content == "echo " + "c" * 80
        sent = branch[-1].prompt_text
        assert "a" * 15 not in sent and "b" * 15 not in sent  # two left out: one guess + retry
        page = get(app, f"/c/{conversation_id}").get_data(as_text=True)
        assert page.index("b" * 15) < page.index("Earlier messages are not sent") < \
            page.index("d" * 15)


def test_fewest_to_drop_reads_the_stored_counts():
    def info(prompt: int, completion: int):
        class Stored:
            id, conversation_id, content, seed, prompt_text = 1, "x" * 22, "", None, None
            template, model, sampling, timings, cached_tokens = "", "", {}, {}, 0
        Stored.prompt_tokens, Stored.completion_tokens = prompt, completion
        return reply_info(Stored())
    sent = [info(20, 20), info(50, 20), info(80, 20)]  # 100 tokens so far
    assert fewest_to_drop(sent, 100, "") == 1  # 100 - 40 = 60 <= 85
    assert fewest_to_drop(sent, 60, "") == 2  # 100 - 70 = 30 <= 51
    assert fewest_to_drop(sent, 60, "x" * 300) == 3  # the new message counts too
    assert fewest_to_drop(sent, None, "") == 1  # unknown context: one, then retried


def test_a_remote_generation_carries_the_messages_sent_upstream(upstream, make_engine):
    generation = make_engine(default_system_prompt="Be brief.").submit(ask("Hi"))
    final(generation)
    assert generation.prompt_by_upstream
    assert json.loads(generation.prompt_text) == upstream.requests[-1]["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

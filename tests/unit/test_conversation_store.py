"""The conversation store, on a real database: what the history, the sockets and the replies
read back is what they wrote, and one owner never sees another's."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tanglebox.conversation_store import ConversationStore, title_from
from tanglebox.database import open_database
from tanglebox.db_schema import ConversationRow
from tests.postgres import database_url, postgres_server  # noqa: F401 - fixtures

ALICE, BOB = "a" * 64, "b" * 64
SETTINGS = {"temperature": 0.7, "maxNewTokens": 128, "systemPrompt": ""}


@pytest.fixture
def store(database_url) -> ConversationStore:
    """A store on each supported database (``database_url``: tests/postgres.py)."""
    database = open_database(database_url)
    yield ConversationStore(database)
    database.close()


def conversation_with(store: ConversationStore, *texts: str, owner: str = ALICE,
                      surface: str = "page", site: str = ""):
    """A conversation of alternating user and assistant messages."""
    conversation = store.create(owner, surface, site, SETTINGS)
    parent_id = None
    for index, text in enumerate(texts):
        role = "user" if index % 2 == 0 else "assistant"
        parent_id = store.add_message(conversation.id, parent_id, role, text).id
    return conversation


def test_a_conversation_reads_back_with_its_settings_and_an_aware_utc_time(store):
    created = store.create(ALICE, "page", "", SETTINGS)
    loaded = store.get(created.id, ALICE)
    assert loaded == created
    assert loaded.settings == SETTINGS and loaded.title == "" and loaded.current_leaf_id is None
    assert loaded.created_at.utcoffset() == timedelta(0)
    assert len(created.id) >= 22 and created.id.replace("-", "").replace("_", "").isalnum()


def test_another_owner_an_unknown_id_and_a_deleted_one_all_read_as_none(store):
    conversation = conversation_with(store, "hello")
    assert store.get(conversation.id, BOB) is None
    assert store.get("no-such-id", ALICE) is None
    assert not store.rename(conversation.id, BOB, "mine now")
    assert not store.delete(conversation.id, BOB)
    assert store.delete(conversation.id, ALICE)
    assert store.get(conversation.id, ALICE) is None
    assert not store.restore(conversation.id, BOB)
    assert store.list(BOB, "page", "") == []


def test_the_branch_is_root_to_leaf_and_a_reply_keeps_its_provenance(store):
    conversation = store.create(ALICE, "page", "", SETTINGS)
    question = store.add_message(conversation.id, None, "user", "What is 2 + 2?")
    reply = store.add_message(conversation.id, question.id, "assistant", "", state="writing",
                              model="SmolLM2", template="chatml",
                              sampling={"temperature": 0.0, "maxNewTokens": 16}, seed=42)
    store.update_reply(reply.id, "It is", "writing")
    store.update_reply(reply.id, "It is 4.", "done", prompt_tokens=12, completion_tokens=4,
                       cached_tokens=0, timings={"ttft_ms": 31.5}, finish_reason="stop")
    first, second = store.branch(conversation.id)
    assert (first.role, first.content, first.state, first.parent_id, first.model) == \
        ("user", "What is 2 + 2?", "done", None, None)
    assert (second.content, second.state, second.parent_id) == ("It is 4.", "done", question.id)
    assert (second.model, second.template, second.seed, second.finish_reason) == \
        ("SmolLM2", "chatml", 42, "stop")
    assert second.sampling == {"temperature": 0.0, "maxNewTokens": 16}
    assert (second.prompt_tokens, second.completion_tokens, second.cached_tokens) == (12, 4, 0)
    assert second.timings == {"ttft_ms": 31.5}
    assert store.get(conversation.id, ALICE).current_leaf_id == reply.id


def test_unknown_metadata_state_role_or_a_parent_from_elsewhere_is_refused(store):
    conversation = conversation_with(store, "hi")
    other = conversation_with(store, "elsewhere")
    with pytest.raises(TypeError, match="colour"):
        store.add_message(conversation.id, None, "user", "x", colour="red")
    with pytest.raises(ValueError, match="state"):
        store.add_message(conversation.id, None, "assistant", "x", state="pondering")
    with pytest.raises(ValueError, match="role"):
        store.add_message(conversation.id, None, "system", "x")
    with pytest.raises(ValueError, match="not in conversation"):
        store.add_message(conversation.id, store.branch(other.id)[0].id, "assistant", "x")


def test_the_title_is_the_first_user_message_cut_at_a_word_and_a_rename_sticks(store):
    long = "Explain   the difference between a process and a thread, with examples in Python"
    conversation = store.create(ALICE, "page", "", SETTINGS)
    question = store.add_message(conversation.id, None, "user", long)
    title = store.get(conversation.id, ALICE).title
    assert title == "Explain the difference between a process and a thread, with…"
    store.add_message(conversation.id, question.id, "assistant", "Sure.")
    store.add_message(conversation.id, question.id, "user", "Something else entirely")
    assert store.get(conversation.id, ALICE).title == title
    assert store.rename(conversation.id, ALICE, "Processes")
    assert store.get(conversation.id, ALICE).title == "Processes"
    assert title_from("short one") == "short one"
    assert title_from("x" * 100) == "x" * 60 + "…"


def test_the_list_is_newest_first_per_surface_and_site_and_skips_empty_chats(store):
    older = conversation_with(store, "older chat")
    newer = conversation_with(store, "newer chat")
    store.create(ALICE, "page", "", SETTINGS)  # no message yet: not listed
    widget = conversation_with(store, "from a site", surface="widget", site="https://a.example")
    conversation_with(store, "bob's", owner=BOB)
    assert [c.id for c in store.list(ALICE, "page", "")] == [newer.id, older.id]
    assert [c.title for c in store.list(ALICE, "page", "")] == ["newer chat", "older chat"]
    assert store.rename(older.id, ALICE, "renamed")  # a rename does not move it up
    assert [c.title for c in store.list(ALICE, "page", "")] == ["newer chat", "renamed"]
    assert [c.id for c in store.list(ALICE, "widget", "https://a.example")] == [widget.id]
    assert store.list(ALICE, "widget", "https://b.example") == []
    store.add_message(older.id, store.branch(older.id)[-1].id, "assistant", "bumped")
    assert [c.id for c in store.list(ALICE, "page", "")] == [older.id, newer.id]
    assert [c.id for c in store.list(ALICE, "page", "", limit=1)] == [older.id]


def test_search_matches_titles_and_message_text_case_insensitively_and_literally(store):
    cooking = conversation_with(store, "Pasta tonight", "Boil the WATER first; 100% salted")
    gardening = conversation_with(store, "Tomatoes", "Water them in the morning")
    conversation_with(store, "Nothing here", "at all")
    unicode_ = conversation_with(store, "Ärger mit Zügen")
    assert {c.id for c in store.list(ALICE, "page", "", query="water")} == \
        {cooking.id, gardening.id}
    assert [c.id for c in store.list(ALICE, "page", "", query="PASTA")] == [cooking.id]
    assert [c.id for c in store.list(ALICE, "page", "", query="100%")] == [cooking.id]
    assert store.list(ALICE, "page", "", query="1_0") == []  # _ is a character, not a wildcard
    assert store.list(ALICE, "page", "", query="%") != []
    assert store.list(ALICE, "page", "", query="nothing at all") == []
    assert [c.id for c in store.list(ALICE, "page", "", query="ärger")] == [unicode_.id]
    assert store.list(BOB, "page", "", query="water") == []


def test_delete_hides_at_once_restore_undoes_and_purge_removes_for_good(store):
    conversation = conversation_with(store, "keep me?", "maybe")
    assert store.delete(conversation.id, ALICE)
    assert store.list(ALICE, "page", "") == []
    assert not store.rename(conversation.id, ALICE, "gone")
    assert store.restore(conversation.id, ALICE)
    assert [c.id for c in store.list(ALICE, "page", "")] == [conversation.id]
    assert store.delete(conversation.id, ALICE)
    assert store.purge_deleted(older_than=timedelta(days=1)) == 0  # too recent
    assert store.restore(conversation.id, ALICE)
    kept = conversation_with(store, "kept")
    assert store.delete(conversation.id, ALICE)
    assert store.purge_deleted(older_than=timedelta(0)) == 1
    assert not store.restore(conversation.id, ALICE)
    assert store.branch(conversation.id) == []
    assert [c.id for c in store.list(ALICE, "page", "")] == [kept.id]


def test_a_delete_removes_for_good_what_was_deleted_over_a_day_ago(store):
    old = conversation_with(store, "deleted long ago")
    recent = conversation_with(store, "deleted just now")
    assert store.delete(old.id, ALICE)
    with store.database.session() as session:  # as if deleted two days ago
        session.get(ConversationRow, old.id).deleted_at -= timedelta(days=2)
    assert store.delete(recent.id, ALICE)
    assert not store.restore(old.id, ALICE)
    assert store.restore(recent.id, ALICE)


def test_regenerate_keeps_the_earlier_reply_as_an_alternative_and_select_flips_back(store):
    conversation = store.create(ALICE, "page", "", SETTINGS)
    question = store.add_message(conversation.id, None, "user", "Name a colour")
    first = store.add_message(conversation.id, question.id, "assistant", "Red")
    follow_up = store.add_message(conversation.id, first.id, "user", "Another?")
    follow_reply = store.add_message(conversation.id, follow_up.id, "assistant", "Blue")
    second = store.add_message(conversation.id, question.id, "assistant", "Green")
    assert [m.content for m in store.branch(conversation.id)] == ["Name a colour", "Green"]
    assert store.alternatives(first.id) == store.alternatives(second.id) == [first.id, second.id]
    assert store.alternatives(follow_up.id) == [follow_up.id]
    store.select(conversation.id, first.id)  # back to "Red": its newest descendant is shown
    assert store.get(conversation.id, ALICE).current_leaf_id == follow_reply.id
    assert [m.content for m in store.branch(conversation.id)] == \
        ["Name a colour", "Red", "Another?", "Blue"]
    store.select(conversation.id, question.id)  # its newest child, "Green", is shown
    assert [m.content for m in store.branch(conversation.id)] == ["Name a colour", "Green"]
    store.select(conversation.id, first.id)
    store.select(conversation.id, second.id)
    assert [m.content for m in store.branch(conversation.id)] == ["Name a colour", "Green"]
    with pytest.raises(ValueError):
        store.select(conversation_with(store, "other").id, first.id)


def test_alternatives_are_the_siblings_of_the_same_role(store):
    conversation = store.create(ALICE, "page", "", SETTINGS)
    question = store.add_message(conversation.id, None, "user", "Hello?")
    reply = store.add_message(conversation.id, question.id, "assistant", "", state="failed")
    again = store.add_message(conversation.id, question.id, "user", "Anyone there?")
    assert store.alternatives(reply.id) == [reply.id]
    assert store.alternatives(again.id) == [again.id]
    assert store.alternatives(10**9) == []


def test_editing_the_first_prompt_makes_a_sibling_root(store):
    conversation = store.create(ALICE, "page", "", SETTINGS)
    original = store.add_message(conversation.id, None, "user", "Helo")
    store.add_message(conversation.id, original.id, "assistant", "Hello?")
    edited = store.add_message(conversation.id, None, "user", "Hello")
    assert store.alternatives(edited.id) == [original.id, edited.id]
    assert [m.content for m in store.branch(conversation.id)] == ["Hello"]


def test_update_settings_is_read_back(store):
    conversation = store.create(ALICE, "page", "", SETTINGS)
    store.update_settings(conversation.id, {**SETTINGS, "temperature": 0.2})
    assert store.get(conversation.id, ALICE).settings["temperature"] == 0.2


def test_a_reply_starts_with_the_persons_message_in_one_call(store):
    conversation = store.create(ALICE, "page", "", SETTINGS)
    prompt_id, reply_id = store.start_reply(conversation.id, None, "Tell me a story",
                                            model="SmolLM2", seed=7)
    prompt, reply = store.branch(conversation.id)
    assert (prompt.id, prompt.role, prompt.content, prompt.state, prompt.parent_id) == \
        (prompt_id, "user", "Tell me a story", "done", None)
    assert (reply.id, reply.role, reply.content, reply.state, reply.parent_id) == \
        (reply_id, "assistant", "", "writing", prompt_id)
    assert (reply.model, reply.seed, prompt.model) == ("SmolLM2", 7, None)
    loaded = store.get(conversation.id, ALICE)
    assert (loaded.current_leaf_id, loaded.title) == (reply_id, "Tell me a story")
    again_prompt, again = store.start_reply(conversation.id, prompt_id, None, model="SmolLM2")
    assert again_prompt is None and store.branch(conversation.id)[-1].id == again
    assert store.alternatives(again) == [reply_id, again]
    other = store.create(BOB, "page", "", SETTINGS)
    with pytest.raises(ValueError, match="is not in conversation"):
        store.start_reply(other.id, prompt_id, "Hi")
    assert store.branch(other.id) == []


def test_replies_being_written_are_saved_together_and_an_ended_one_keeps_its_end(store):
    first, second = (conversation_with(store, "Tell me a story") for _ in range(2))
    replies = [store.add_message(c.id, store.branch(c.id)[0].id, "assistant", "",
                                 state="writing") for c in (first, second)]
    store.save_writing({replies[0].id: "Once upon", replies[1].id: "Long ago"})
    assert [store.branch(c.id)[-1].content for c in (first, second)] == ["Once upon", "Long ago"]
    store.update_reply(replies[1].id, "Long ago, the end.", "done")
    store.save_writing({replies[0].id: "Once upon a time", replies[1].id: "Long ago, the"})
    ended = store.branch(second.id)[-1]
    assert (ended.content, ended.state) == ("Long ago, the end.", "done")
    writing = store.branch(first.id)[-1]
    assert (writing.content, writing.state) == ("Once upon a time", "writing")


def test_unfinished_replies_become_interrupted_keeping_their_text(store):
    conversation = store.create(ALICE, "page", "", SETTINGS)
    question = store.add_message(conversation.id, None, "user", "Tell me a story")
    reply = store.add_message(conversation.id, question.id, "assistant", "", state="writing")
    store.update_reply(reply.id, "Once upon a time", "writing")
    assert store.interrupt_unfinished() == 1
    saved = store.branch(conversation.id)[-1]
    assert (saved.content, saved.state, saved.note) == \
        ("Once upon a time", "interrupted", "Interrupted")
    assert store.interrupt_unfinished() == 0

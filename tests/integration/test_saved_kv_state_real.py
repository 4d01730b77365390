"""A conversation's KV cache saved on disk, on the real SmolLM2 model through llama.cpp: its next
turn after a restart (a fresh backend and engine on the same folder) reads only the new tokens,
and says what a cold start says."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.kv_restore import long_conversation, prompt_counter
from tanglebox.backends import load_backend
from tanglebox.chat_request import ChatRequest
from tanglebox.engine import Done, Engine, engine_from_settings
from tanglebox.model_location import locate_model
from tanglebox.prompting import ASSISTANT, USER, Message
from tanglebox.settings import load_settings
from tests.replies import collect_reply

pytestmark = pytest.mark.real_model


def start(folder: Path, slots: int = 1, kv_cache_megabytes: int = 1024) -> Engine:
    """A fresh backend and engine, as a (re)started server makes them, its settings in
    ``folder`` (so its KV cache folder is ``folder / "kv-cache"``)."""
    settings = load_settings(folder / "settings.json", {
        "contextLength": 4096, "parallelSlots": slots,
        "kvCacheDiskMegabytes": kv_cache_megabytes}, environ={})
    return engine_from_settings(settings, load_backend(settings, locate_model(settings)))


def ask(engine: Engine, messages: tuple[Message, ...]) -> Done:
    _, done = collect_reply(engine.submit(ChatRequest(messages, "", 0.0, 24)))
    assert isinstance(done, Done), done
    return done


def saved_files(folder: Path) -> list[Path]:
    return list((folder / "kv-cache").rglob("*.kvstate"))


def test_the_next_turn_after_a_restart_reads_only_the_new_tokens_and_says_the_same(tmp_path):
    engine = start(tmp_path)
    conversation = long_conversation(prompt_counter(engine), 2000)
    first = ask(engine, conversation)
    assert first.prompt_tokens >= 2000
    engine.stop(drain_seconds=5)  # a clean stop saves the slot's state
    assert len(saved_files(tmp_path)) == 1

    next_turn = (*conversation, Message(ASSISTANT, first.text),
                 Message(USER, "And which place did note 5 mention?"))
    restarted = start(tmp_path)
    try:
        restored = ask(restarted, next_turn)
    finally:
        restarted.stop(drain_seconds=5)
    cold_folder = tmp_path / "cold"
    cold_folder.mkdir()
    cold_engine = start(cold_folder, kv_cache_megabytes=0)
    try:
        cold = ask(cold_engine, next_turn)
    finally:
        cold_engine.stop(drain_seconds=5)

    assert restored.cached_tokens >= first.prompt_tokens  # the history came from disk
    assert cold.cached_tokens < 64  # (at most a template's opening shared with nothing here)
    assert restored.prompt_tokens == cold.prompt_tokens
    assert restored.text == cold.text  # greedy on the same tokens: the same reply
    assert not saved_files(cold_folder)  # 0 megabytes: off


def test_a_conversation_whose_slot_went_to_another_comes_back_from_disk(tmp_path):
    engine = start(tmp_path)
    try:
        count = prompt_counter(engine)
        first = long_conversation(count, 400)
        # Another conversation: the same notes, in other words from the first message on.
        other = tuple(Message(m.role, m.content.replace("Note", "Memo")) for m in first)
        first_reply = ask(engine, first)
        assert not saved_files(tmp_path)  # the slot still holds it
        ask(engine, other)  # takes the only slot: the first conversation's state is saved
        assert len(saved_files(tmp_path)) == 1
        again = ask(engine, (*first, Message(ASSISTANT, first_reply.text),
                             Message(USER, "Thank you.")))
    finally:
        engine.stop(drain_seconds=5)
    assert again.cached_tokens >= first_reply.prompt_tokens


def test_a_saved_state_llama_cpp_refuses_is_removed_and_the_prompt_read_in_full(tmp_path):
    engine = start(tmp_path)
    try:
        conversation = long_conversation(prompt_counter(engine), 300)
        prompt = engine.render(ChatRequest(conversation, "", 0.0, 1)).text
        # A file the folder trusts (this model's, whole) holding no state llama.cpp can load.
        engine.backend.saved_states.write(engine.backend.tokenize(prompt), bytes(4096))
        (refused,) = saved_files(tmp_path)
        done = ask(engine, conversation)
        assert not refused.exists()
    finally:
        engine.stop(drain_seconds=5)
    assert done.cached_tokens < 64
    assert done.completion_tokens > 0


def test_a_kv_cache_folder_that_cannot_be_made_leaves_the_cache_off_not_the_server(
        tmp_path, caplog):
    (tmp_path / "kv-cache").write_text("a file where the folder would be")
    engine = start(tmp_path)
    try:
        done = ask(engine, (Message(USER, "What is 2 + 2?"),))
    finally:
        engine.stop(drain_seconds=5)
    assert "4" in done.text
    assert "KV caches will not be saved" in caplog.text and "kv-cache" in caplog.text

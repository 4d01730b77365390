"""Replies owned by the server (``reply_runs``): a run on the fake backend, saved into a
recording saver, watched (or not) by stand-ins for sockets."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest

from tanglebox import reply_runs
from tanglebox.chat_request import ChatRequest
from tanglebox.prompting import USER, Message
from tanglebox.reply_runs import Busy, ReplyRun, ReplyRuns
from tests.fake_backend import FakeBackend
from tests.live_server import wait_until


@dataclass
class SavedMessage:
    id: int
    parent_id: int | None
    role: str
    content: str
    state: str
    note: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


class RecordingSaver:
    """The store's calls a run makes, kept in memory; every save recorded."""

    def __init__(self) -> None:
        self.messages: dict[int, SavedMessage] = {}
        self.saves: list[tuple[int, str, str]] = []  # (message id, content, state)
        self.save_calls: list[dict[int, str]] = []  # save_writing's arguments
        self._ids = itertools.count(1)

    def start_reply(self, conversation_id: str, parent_id: int | None, prompt: str | None,
                    **metadata: Any) -> tuple[int | None, int]:
        prompt_id = None
        if prompt is not None:
            prompt_id = parent_id = self._add(parent_id, "user", prompt, "done", {})
        return prompt_id, self._add(parent_id, "assistant", "", "writing", metadata)

    def _add(self, parent_id, role, content, state, metadata) -> int:
        message = SavedMessage(next(self._ids), parent_id, role, content, state,
                               metadata=metadata)
        self.messages[message.id] = message
        return message.id

    def save_writing(self, texts: dict[int, str]) -> None:
        self.save_calls.append(dict(texts))
        for message_id, content in texts.items():
            message = self.messages[message_id]
            if message.state == "writing":
                message.content = content
                self.saves.append((message_id, content, "writing"))

    def update_reply(self, message_id: int, content: str, state: str, note: str = "",
                     **metadata: Any) -> None:
        message = self.messages[message_id]
        message.content, message.state, message.note = content, state, note
        message.metadata.update(metadata)
        self.saves.append((message_id, content, state))

    def reply(self) -> SavedMessage:
        [reply] = [m for m in self.messages.values() if m.role == "assistant"]
        return reply


@pytest.fixture
def fake_backend(request) -> FakeBackend:
    """``@pytest.mark.parametrize("fake_backend", [{...}], indirect=True)`` to configure it."""
    return FakeBackend(**getattr(request, "param", {}))


@pytest.fixture
def saver() -> RecordingSaver:
    return RecordingSaver()


def submit(app, prompt: str, max_new_tokens: int = 3000):
    runtime = app.extensions["tanglebox"]
    return runtime.submit(ChatRequest(messages=(Message(USER, prompt),), system_prompt="",
                                      temperature=0.0, max_new_tokens=max_new_tokens))


def ended(run: ReplyRun, timeout: float = 30.0) -> reply_runs.ReplyEnd:
    wait_until(lambda: run.wait_for(run.version, 0.5) and run.ended, timeout, "the run's end")
    return run.ended


COUNT_40 = " ".join(str(i) for i in range(1, 41))
COUNT_60 = " ".join(str(i) for i in range(1, 61))
METADATA = {"model": "fake", "sampling": {"temperature": 0.0}, "seed": None}


def test_a_reply_is_stored_with_its_prompt_text_and_metadata(app, saver):
    runs = ReplyRuns(saver)
    run = runs.start("c1", None, "count 40", submit(app, "count 40"), METADATA)
    assert ended(run).state == "done" and run.ended.note == ""
    prompt, reply = saver.messages[run.prompt_message_id], saver.reply()
    assert (prompt.role, prompt.content, prompt.parent_id) == ("user", "count 40", None)
    assert reply.parent_id == prompt.id and reply.id == run.message_id
    assert (reply.content, reply.state) == (COUNT_40, "done") and run.text == COUNT_40
    assert reply.metadata["model"] == "fake" and reply.metadata["finish_reason"] == "stop"
    assert reply.metadata["completion_tokens"] == len(COUNT_40)  # one byte a token
    assert reply.metadata["prompt_tokens"] > 0 and "timings" in reply.metadata
    assert len(runs) == 0  # the run left the map: the conversation can start another


def test_a_regenerated_reply_follows_the_given_message(app, saver):
    runs = ReplyRuns(saver)
    run = runs.start("c1", 7, None, submit(app, "echo again"), METADATA)
    ended(run)
    assert run.prompt_message_id is None and saver.reply().parent_id == 7
    assert saver.reply().content == "again"


def test_the_text_is_saved_as_it_grows_not_only_at_the_end(app, saver, fake_backend,
                                                          monkeypatch):
    monkeypatch.setattr(reply_runs, "SAVE_INTERVAL_SECONDS", 0.05)
    fake_backend.step_delay = 0.01
    run = ReplyRuns(saver).start("c1", None, "count 60", submit(app, "count 60"), METADATA)
    ended(run)
    writing = [content for _, content, state in saver.saves if state == "writing"]
    assert writing and all(COUNT_40.split()[0] in c for c in writing)
    assert all(" ".join(str(i) for i in range(1, 61)).startswith(c) for c in writing)
    assert saver.saves[-1][2] == "done"


def test_replies_written_at_once_are_saved_together(app, saver, fake_backend, monkeypatch):
    monkeypatch.setattr(reply_runs, "SAVE_INTERVAL_SECONDS", 0.05)
    fake_backend.step_delay = 0.01
    runs = ReplyRuns(saver)
    both = [runs.start(c, None, "count 60", submit(app, "count 60"), METADATA)
            for c in ("c1", "c2")]
    for run in both:
        ended(run)
    ids = {run.message_id for run in both}
    assert any(set(call) == ids for call in saver.save_calls)  # one call for the two
    assert all(content == COUNT_60 for _, content, state in saver.saves if state == "done")


def test_a_failed_save_leaves_the_reply_going_and_its_end_saved(app, saver, fake_backend,
                                                                 monkeypatch, caplog):
    monkeypatch.setattr(reply_runs, "SAVE_INTERVAL_SECONDS", 0.05)
    fake_backend.step_delay = 0.01

    def database_down(texts):
        raise OSError("the database is down")

    monkeypatch.setattr(saver, "save_writing", database_down)
    run = ReplyRuns(saver).start("c1", None, "count 60", submit(app, "count 60"), METADATA)
    assert ended(run).state == "done" and saver.reply().content == COUNT_60
    assert "saving the replies being written failed" in caplog.text


def test_stop_keeps_what_was_written(app, saver, fake_backend):
    fake_backend.step_delay = 0.01
    run = ReplyRuns(saver).start("c1", None, "count 2000", submit(app, "count 2000"), METADATA)
    wait_until(lambda: len(run.text) > 10, what="some text")
    run.stop()
    assert ended(run).state == "stopped" and run.ended.note == "Stopped."
    reply = saver.reply()
    assert reply.content == run.text and 10 < len(reply.content) < 1000
    assert reply.metadata["finish_reason"] == "cancelled"


def test_a_reply_goes_on_when_its_last_watcher_leaves(app, saver, fake_backend):
    fake_backend.step_delay = 0.005
    run = ReplyRuns(saver).start("c1", None, "count 40", submit(app, "count 40"), METADATA)
    with run.watching():
        pass
    assert ended(run).state == "done" and saver.reply().content == COUNT_40


def test_without_finishing_unwatched_replies_the_last_watcher_leaving_stops_it(
        app, saver, fake_backend):
    fake_backend.step_delay = 0.01
    runs = ReplyRuns(saver, finish_without_watchers=False)
    run = runs.start("c1", None, "count 2000", submit(app, "count 2000"), METADATA)
    with run.watching():
        with run.watching():
            wait_until(lambda: run.text, what="some text")
        assert run.ended is None  # one watcher is still there
    assert ended(run).state == "interrupted" and run.ended.note == "Interrupted"
    assert saver.reply().content == run.text and len(run.text) < 1000


def test_one_run_per_conversation(app, saver, fake_backend):
    fake_backend.step_delay = 0.01
    runs = ReplyRuns(saver)
    first = runs.start("c1", None, "count 2000", submit(app, "count 2000"), METADATA)
    second = submit(app, "echo two")
    with pytest.raises(Busy):
        runs.start("c1", None, "echo two", second, METADATA)
    assert second.cancelled and runs.get("c1") is first and runs.busy("c1")
    other = runs.start("c2", None, "echo other", submit(app, "echo other"), METADATA)
    first.stop()
    ended(first), ended(other)
    assert not runs.busy("c1")


def test_an_engine_shutdown_mid_reply_saves_it_interrupted(app, saver, fake_backend):
    fake_backend.step_delay = 0.01
    run = ReplyRuns(saver).start("c1", None, "count 2000", submit(app, "count 2000"), METADATA)
    wait_until(lambda: run.text, what="some text")
    app.extensions["tanglebox"].engines()[0].stop(drain_seconds=0)
    assert ended(run).state == "interrupted" and saver.reply().content == run.text


@pytest.mark.parametrize("fake_backend", [{"context_length": 64}], indirect=True)
def test_a_request_that_fails_before_any_text_stores_nothing(app, saver):
    prompt = "a question far too long for this tiny context " * 3
    run = ReplyRuns(saver).start("c1", None, prompt, submit(app, prompt), METADATA)
    end = ended(run)
    assert end.state == "failed" and "context" in end.error
    assert saver.messages == {}


def test_watchers_are_woken_with_the_whole_text_so_far(app, saver, fake_backend):
    fake_backend.step_delay = 0.005
    run = ReplyRuns(saver).start("c1", None, "count 40", submit(app, "count 40"), METADATA)
    seen, version = [], 0
    with run.watching():
        while run.ended is None:
            if run.wait_for(version, 5):
                version = run.version
                seen.append(run.text)
    assert all(COUNT_40.startswith(text) for text in seen) and seen[-1] == COUNT_40

"""The remote engine against a fake upstream (tests/fake_upstream.py): the local engine's
contract (events, finish reasons, counts, queue, cancel, timeouts) and every upstream fault."""

from __future__ import annotations

import time
from typing import Callable

import pytest

from tanglebox.chat_request import ChatRequest, SamplingOptions
from tanglebox.generation import Delta, Done, Error, ErrorCode, FinishReason, Generation
from tanglebox.prompting import ASSISTANT, USER, Message
from tanglebox.remote_engine import EndpointUnavailable, RemoteEngine
from tanglebox.served_models import ModelState
from tanglebox.upstream_client import Upstream
from tanglebox.waiting_queue import QueueFull
from tests.fake_upstream import FakeUpstream

KEY = "sk-test-secret-4242"
WAIT_SECONDS = 10


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def ask(text: str = "Hi", **fields) -> ChatRequest:
    return ChatRequest((Message(USER, text),), "", 0.0, 50, **fields)


def final(generation: Generation) -> tuple[str, Done | Error]:
    """The streamed text and the final event (each event within ``WAIT_SECONDS``)."""
    text = ""
    while True:
        event = generation.next_event(WAIT_SECONDS)
        if event is None:
            raise AssertionError(f"no event within {WAIT_SECONDS} s after {text!r}")
        if not isinstance(event, Delta):
            return text, event
        text += event.text


@pytest.fixture
def upstream():
    with FakeUpstream(key=KEY) as fake:
        yield fake


@pytest.fixture
def make_engine(upstream):
    engines = []

    def make(key: str = KEY, max_concurrent: int = 2, timeout: float = 5.0,
             request_timeout: float = 30.0, queue_size: int = 4, ready: bool = True,
             **kwargs) -> RemoteEngine:
        engine = RemoteEngine(Upstream("big", upstream.base_url, "fake-model", "FAKE_KEY", key,
                                       max_concurrent, timeout),
                              queue_size=queue_size, request_timeout=request_timeout, **kwargs)
        engine.start()
        engines.append(engine)
        if ready:
            wait_until(lambda: engine.state == ModelState.READY, "the endpoint to be ready")
        return engine

    yield make
    for engine in engines:
        engine.stop(drain_seconds=0)


def test_a_reply_streams_with_its_finish_reason_and_usage(upstream, make_engine):
    upstream.finish_reason = "length"
    upstream.usage = {"prompt_tokens": 21, "completion_tokens": 7, "total_tokens": 28,
                      "prompt_tokens_details": {"cached_tokens": 16}}
    events = list(make_engine().submit(ask()).events())
    assert [e.text for e in events[:-1]] == ["Hello", ", ", "world"]
    done = events[-1]
    assert isinstance(done, Done) and done.finish_reason == FinishReason.LENGTH
    assert (done.text, done.prompt_tokens, done.completion_tokens, done.cached_tokens) == (
        "Hello, world", 21, 7, 16)
    assert set(done.timings) == {"queueMs", "promptMs", "generationMs", "tokensPerSecond"}


def test_without_usage_the_pieces_are_counted(upstream, make_engine):
    upstream.usage = None
    _, done = final(make_engine().submit(ask()))
    assert done.completion_tokens == 3 and done.prompt_tokens == 0


def test_each_delta_arrives_before_the_upstream_has_finished(upstream, make_engine):
    upstream.mode, upstream.stall_after = "stall", 1
    generation = make_engine().submit(ask())
    assert generation.next_event(WAIT_SECONDS) == Delta("Hello")  # the rest is still held back
    upstream.release.set()
    assert final(generation)[1].text == "Hello, world"


def test_the_request_carries_messages_and_sampling_with_usage_asked_for(upstream, make_engine):
    engine = make_engine(default_system_prompt="Be brief.")
    sampling = SamplingOptions(top_p=0.5, top_k=7, seed=3, presence_penalty=0.5,
                               frequency_penalty=-0.5, logit_bias=((42, -100.0),))
    request = ChatRequest((Message(USER, "Hi"), Message(ASSISTANT, "Hello"),
                           Message(USER, "Capital of France?")), "", 0.2, 9,
                          stop=("\n\n",), sampling=sampling)
    final(engine.submit(request))
    body = upstream.requests[-1]
    assert upstream.paths[-1] == "POST /v1/chat/completions"
    assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"},
                                {"role": "assistant", "content": "Hello"},
                                {"role": "user", "content": "Capital of France?"}]
    assert body["model"] == "fake-model" and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["max_tokens"], body["top_p"], body["top_k"],
            body["seed"], body["stop"]) == (0.2, 9, 0.5, 7, 3, ["\n\n"])
    assert (body["presence_penalty"], body["frequency_penalty"], body["logit_bias"]) == (
        0.5, -0.5, {"42": -100.0})


def test_a_request_s_own_system_prompt_wins_and_defaults_are_not_sent(upstream, make_engine):
    final(make_engine(default_system_prompt="Be brief.").submit(
        ChatRequest((Message(USER, "Hi"),), "Be a pirate.", 0.7, 5)))
    body = upstream.requests[-1]
    assert body["messages"][0] == {"role": "system", "content": "Be a pirate."}
    assert not {"top_k", "seed", "stop", "logit_bias", "presence_penalty"} & set(body)


def test_a_raw_prompt_goes_to_completions(upstream, make_engine):
    text, done = final(make_engine().submit(ask(prompt_text="Once upon a time")))
    assert upstream.paths[-1] == "POST /v1/completions"
    assert upstream.requests[-1]["prompt"] == "Once upon a time"
    assert "messages" not in upstream.requests[-1]
    assert text == "Hello, world" and isinstance(done, Done)


def test_connections_are_kept_alive_and_reused(upstream, make_engine):
    engine = make_engine()
    before = upstream.connections  # the health check's
    for _ in range(3):
        assert isinstance(final(engine.submit(ask()))[1], Done)
    assert upstream.connections == before + 1


def test_a_kept_alive_connection_the_upstream_closed_is_replaced_unseen(upstream, make_engine):
    upstream.close_idle = True
    engine = make_engine()
    replies = [final(engine.submit(ask())) for _ in range(3)]
    assert all(text == "Hello, world" and isinstance(done, Done) for text, done in replies)
    assert len(upstream.requests) == 3 and engine.upstream_errors == 0


def test_cancel_closes_the_upstream_stream_at_once(upstream, make_engine):
    upstream.mode, upstream.stall_after = "stall", 1
    engine = make_engine(timeout=600)  # nothing else would end the stall within the test
    generation = engine.submit(ask())
    assert generation.next_event(WAIT_SECONDS) == Delta("Hello")
    generation.cancel()
    text, done = final(generation)
    assert upstream.client_gone.wait(WAIT_SECONDS)
    assert done.finish_reason == FinishReason.CANCELLED and done.text == "Hello"
    wait_until(lambda: engine.load()["busy"] == 0, "the place to be free")


def test_request_timeout_ends_the_reply_with_its_text_so_far(upstream, make_engine):
    upstream.mode, upstream.stall_after = "stall", 1
    text, done = final(make_engine(timeout=600, request_timeout=0.5).submit(ask()))
    assert text == "Hello"
    assert isinstance(done, Done) and done.finish_reason == FinishReason.TIMEOUT
    assert upstream.client_gone.wait(WAIT_SECONDS)


def test_an_upstream_silent_past_its_timeout_is_an_upstream_error(upstream, make_engine):
    upstream.mode = "stall"
    text, error = final(make_engine(timeout=0.3).submit(ask()))
    assert text == "" and isinstance(error, Error) and error.code == ErrorCode.UPSTREAM
    assert error.message == "The model big did not answer in time; try again later."


def test_killed_mid_reply_gives_the_text_so_far_and_a_clear_error(upstream, make_engine):
    upstream.mode, upstream.die_after = "die", 2
    text, error = final(make_engine().submit(ask()))
    assert text == "Hello, "
    assert isinstance(error, Error) and error.code == ErrorCode.UPSTREAM
    assert "stopped in the middle of the reply" in error.message


@pytest.mark.parametrize("mode, status, message", [
    ("status", 500, "The model big could not answer (its server said HTTP 500)."),
    ("status", 400, "The model big could not answer (its server said HTTP 400)."),
    ("malformed", None, "The model big sent a reply that could not be read; try again later."),
])
def test_an_upstream_error_before_any_text_is_an_upstream_error(upstream, make_engine, mode,
                                                                 status, message):
    upstream.mode, upstream.status = mode, status
    engine = make_engine()
    text, error = final(engine.submit(ask()))
    assert (text, error) == ("", Error(ErrorCode.UPSTREAM, message))
    assert "upstream says no" not in error.message  # the upstream's words are for the log
    assert engine.upstream_errors == 1
    assert engine.state == ModelState.READY  # it answered: it is up


def test_an_error_chunk_mid_stream_ends_the_reply_with_an_error(upstream, make_engine, caplog):
    upstream.mode = "error_chunk"
    text, error = final(make_engine().submit(ask()))
    assert text == "Hello" and error.code == ErrorCode.UPSTREAM
    assert "remote big: the upstream ended the stream with an error" in caplog.text


def test_a_wrong_key_makes_the_model_unavailable_naming_the_variable_not_the_key(
        upstream, make_engine):
    engine = make_engine(key="sk-wrong-key", ready=False)
    wait_until(lambda: engine.state == ModelState.UNAVAILABLE, "the failed check")
    assert engine.status().detail == "401 from upstream: check apiKeyEnv FAKE_KEY"
    assert "sk-wrong-key" not in repr(engine.upstream)
    with pytest.raises(EndpointUnavailable):
        engine.submit(ask())


def test_an_upstream_down_at_start_recovers_by_itself(upstream, make_engine):
    upstream.down()
    engine = make_engine(ready=False)
    wait_until(lambda: engine.state == ModelState.UNAVAILABLE, "the failed check")
    assert engine.status().detail == "connection refused"
    upstream.up()
    wait_until(lambda: engine.state == ModelState.READY, "the endpoint to come back")
    assert final(engine.submit(ask()))[0] == "Hello, world"


def test_a_refused_connection_mid_service_marks_the_model_unavailable(upstream, make_engine):
    engine = make_engine()
    upstream.down()
    text, error = final(engine.submit(ask()))
    assert error == Error(ErrorCode.UNAVAILABLE, "The model big is unavailable; try again later.")
    assert engine.state == ModelState.UNAVAILABLE


def test_max_concurrent_runs_that_many_and_queues_the_rest_fairly(upstream, make_engine):
    upstream.mode = "stall"
    engine = make_engine(max_concurrent=1, queue_size=1)
    first = engine.submit(ask(client_id="a"))
    second = engine.submit(ask(client_id="b"))
    wait_until(lambda: len(upstream.requests) == 1, "the first request upstream")
    assert engine.status().busy == 1 and engine.status().waiting == 1
    with pytest.raises(QueueFull):
        engine.submit(ask(client_id="c"))
    upstream.release.set()
    assert final(first)[0] == "Hello, world" and final(second)[0] == "Hello, world"
    assert len(upstream.requests) == 2


def test_a_queued_request_whose_client_left_never_reaches_the_upstream(upstream, make_engine):
    upstream.mode = "stall"
    engine = make_engine(max_concurrent=1)
    running = engine.submit(ask())
    waiting = engine.submit(ask())
    wait_until(lambda: len(upstream.requests) == 1, "the first request upstream")
    waiting.cancel()
    assert final(waiting)[1].finish_reason == FinishReason.CANCELLED
    upstream.release.set()
    final(running)
    assert len(upstream.requests) == 1


def test_stop_ends_running_replies_with_shutdown_after_the_drain(upstream, make_engine):
    upstream.mode, upstream.stall_after = "stall", 1
    engine = make_engine()
    generation = engine.submit(ask())
    assert generation.next_event(WAIT_SECONDS) == Delta("Hello")
    engine.stop(drain_seconds=0.2, wait=False)
    text, done = final(generation)
    assert done.finish_reason == FinishReason.SHUTDOWN and done.text == "Hello"

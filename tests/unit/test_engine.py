"""The engine on the fake backend: events, limits, cancel, queueing, fairness, prefix reuse."""

from __future__ import annotations

import threading

import pytest

from tanglebox.chat_request import ChatRequest
from tanglebox.engine import Delta, Engine, EngineStopped, Error, QueueFull
from tanglebox.prompting import ASSISTANT, USER, Message
from tests.fake_backend import FakeBackend
from tests.live_server import wait_until
from tests.replies import collect_reply


def request(text: str, max_new_tokens: int = 200, client: str = "", stop=()) -> ChatRequest:
    return ChatRequest((Message(USER, text),), "", 0.0, max_new_tokens, client, tuple(stop))


@pytest.fixture
def make_engine():
    engines = []

    def make(queue_size: int = 8, **backend_options) -> Engine:
        engine = Engine(FakeBackend(**backend_options), "auto", queue_size=queue_size)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop(drain_seconds=1)


def test_deltas_then_done_with_counts_and_timings(make_engine):
    engine = make_engine()
    engine.start()
    streamed, done = collect_reply(engine.submit(request("echo Hello, world")))
    assert streamed == done.text == "Hello, world"
    assert done.finish_reason == "stop"
    assert done.completion_tokens == len("Hello, world")
    assert done.prompt_tokens > 0
    assert set(done.timings) == {"queueMs", "promptMs", "generationMs", "tokensPerSecond"}


def test_max_new_tokens_ends_with_length(make_engine):
    engine = make_engine()
    engine.start()
    _, done = collect_reply(engine.submit(request("count 50", max_new_tokens=7)))
    assert done.finish_reason == "length"
    assert done.text == "1 2 3 4"


def test_request_stop_strings_are_held_back_and_never_leak(make_engine):
    engine = make_engine()
    engine.start()
    streamed, done = collect_reply(engine.submit(request("echo one ## two ### three", stop=["###"])))
    assert streamed == done.text == "one ## two "
    assert done.finish_reason == "stop"


def test_utf8_characters_arrive_whole(make_engine):
    engine = make_engine()
    engine.start()
    generation = engine.submit(request("echo naïve café €"))
    deltas = [e.text for e in generation.events() if isinstance(e, Delta)]
    assert "".join(deltas) == "naïve café €"
    assert all("\ufffd" not in d for d in deltas)


def test_cancel_stops_at_the_next_step_and_frees_the_slot(make_engine):
    engine = make_engine(max_sequences=1, step_delay=0.01)
    engine.start()
    generation = engine.submit(request("count 1000", max_new_tokens=4000))
    assert isinstance(generation.next_event(timeout=10), Delta)
    generation.cancel()
    _, done = collect_reply(generation)
    assert done.finish_reason == "cancelled"
    assert done.completion_tokens < 1000
    _, following = collect_reply(engine.submit(request("echo next")))
    assert following.text == "next"


def test_cancel_during_a_long_prompt(make_engine):
    engine = make_engine(max_sequences=1, batch_tokens=8, step_delay=0.01)
    engine.start()
    generation = engine.submit(request("echo " + "x" * 2000))
    wait_until(lambda: engine.load()["busy"] == 1, timeout=10.0)
    generation.cancel()
    _, done = collect_reply(generation)
    assert done.finish_reason == "cancelled" and done.completion_tokens == 0


def test_a_full_queue_is_refused_at_once(make_engine):
    engine = make_engine(queue_size=1, max_sequences=1, step_delay=0.01)
    engine.start()
    running = engine.submit(request("count 500", max_new_tokens=1000))
    waiting = engine.submit(request("echo waiting"))
    with pytest.raises(QueueFull) as refused:
        engine.submit(request("echo refused"))
    assert refused.value.retry_after > 0
    running.cancel()
    assert collect_reply(waiting)[1].text == "waiting"


def test_a_prompt_longer_than_the_context_is_an_error_with_counts(make_engine):
    engine = make_engine(context_length=64)
    engine.start()
    _, error = collect_reply(engine.submit(request("echo " + "y" * 100)))
    assert isinstance(error, Error) and error.code == "prompt_too_long"
    assert "108 tokens" in error.message and "holds 64" in error.message  # 105 + 3 specials


def test_the_reply_stops_at_the_end_of_the_context(make_engine):
    engine = make_engine(context_length=40)
    engine.start()
    _, done = collect_reply(engine.submit(request("count 100")))
    assert done.finish_reason == "length"


def test_slots_run_side_by_side_in_one_batched_decode(make_engine):
    engine = make_engine(max_sequences=4)
    generations = [engine.submit(request(f"echo reply number {i}")) for i in range(4)]
    engine.start()
    results = [collect_reply(g)[1].text for g in generations]
    assert results == [f"reply number {i}" for i in range(4)]
    assert max(len(items) for items in engine.backend.decode_calls) == 4


def test_round_robin_admission_across_clients(make_engine):
    engine = make_engine(max_sequences=1, queue_size=10)
    words = ["alpha", "bravo", "charlie", "delta", "echo"]  # distinct first letters: the cached
    greedy = [engine.submit(request(f"echo {w}", client="greedy")) for w in words]  # prefix
    polite = engine.submit(request("echo polite", client="polite"))  # ends at "echo "
    engine.start()
    for generation in greedy + [polite]:
        collect_reply(generation)
    admitted = []  # prompts in the order the model first read them
    for items in engine.backend.decode_calls:
        for item in items:
            text = bytes(t for t in item.tokens if t < 256).decode().removeprefix("echo ")
            if len(item.tokens) > 1 and text and text not in admitted:
                admitted.append(text)
    assert admitted[:2] == ["alpha", "polite"]  # not behind the greedy client's other four

def test_a_new_reply_takes_a_slot_next_to_the_busy_ones(make_engine):
    """llama.cpp decodes each run of consecutive slots in a pass of its own: a free slot
    between two busy ones beats the least recently used one at the end."""
    engine = make_engine(max_sequences=4, step_delay=0.002)
    long_a, middle, long_c, short = (engine.submit(request(text, client=str(i))) for i, text in
                                     enumerate(["count 400", "echo b" * 20, "count 400", "echo d"]))
    engine.start()
    collect_reply(short)  # slot 3 is free first (least recently used) ...
    collect_reply(middle)  # ... then slot 1, between the two long replies
    newcomer = engine.submit(request("echo newcomer"))
    assert collect_reply(newcomer)[1].text == "newcomer"
    long_a.cancel()
    long_c.cancel()
    slots = {bytes(t for t in item.tokens if t < 256).decode(): item.slot
             for items in engine.backend.decode_calls for item in items if len(item.tokens) > 1}
    assert [slot for text, slot in slots.items() if "newcomer" in text] == [1]


def test_readers_are_woken_after_the_step_has_handed_out_every_token(make_engine):
    """Under gevent a woken reader's greenlet takes the GIL at the token loop's next GIL
    release (numpy's argmax, a ctypes call) and holds up the next decode while it runs."""
    engine = make_engine(max_sequences=3)
    generations = [engine.submit(request(f"echo reply {i}")) for i in range(3)]
    order = []  # what the engine thread did, in order
    decode, token_bytes = engine.backend.decode, engine.backend.token_bytes
    engine.backend.decode = lambda items: (order.append("decode"), decode(items))[1]
    engine.backend.token_bytes = lambda token: (order.append("token"), token_bytes(token))[1]
    for generation in generations:
        channel = generation._channel
        channel.wake = lambda wake=channel.wake: (order.append("wake"), wake())
    engine.start()
    assert [collect_reply(g)[1].text for g in generations] == [f"reply {i}" for i in range(3)]
    steps = "".join("|" if event == "decode" else event[0] for event in order).split("|")
    assert "tw" in "".join(steps)  # tokens were handed out and readers woken
    assert all("wt" not in step for step in steps)  # and never a token after a wake-up


def test_the_next_turn_reuses_the_cached_conversation(make_engine):
    engine = make_engine(max_sequences=2)
    engine.start()
    first = collect_reply(engine.submit(request("echo The capital is Paris.")))[1]
    history = (Message(USER, "echo The capital is Paris."), Message(ASSISTANT, first.text),
               Message(USER, "echo And of Italy?"))
    second = collect_reply(engine.submit(ChatRequest(history, "", 0.0, 100)))[1]
    assert second.text == "And of Italy?"
    assert second.cached_tokens >= first.prompt_tokens


def test_stop_drains_running_replies_then_refuses_new_work(make_engine):
    engine = make_engine()
    engine.start()
    generation = engine.submit(request("echo finishing"))
    engine.stop(drain_seconds=5)
    assert collect_reply(generation)[1].text == "finishing"
    with pytest.raises(EngineStopped):
        engine.submit(request("echo too late"))
    assert engine.backend.closed


def test_stop_again_returns_at_once_when_the_engine_has_stopped(make_engine):
    engine = make_engine()
    engine.start()
    engine.stop(drain_seconds=600)  # nothing runs: the engine ends at once
    assert engine.backend.closed
    again = threading.Thread(target=engine.stop, kwargs={"drain_seconds": 600}, daemon=True)
    again.start()
    again.join(timeout=30)  # a deadline, not a wait: the call should return at once
    assert not again.is_alive(), "a second stop() waited for an engine that had stopped"


def test_a_long_prompt_is_read_in_chunks_while_a_reply_streams(make_engine):
    # The stream cannot end before the long prompt is read (23,893 tokens, at least 24 s at
    # the step delay, in a context with room for them): it is cancelled once the prompt is.
    engine = make_engine(max_sequences=2, batch_tokens=64, context_length=100_000,
                         step_delay=0.001)
    engine.prefill_chunk = 8
    engine.start()
    streaming = engine.submit(request("count 5000", max_new_tokens=50_000))
    assert isinstance(streaming.next_event(timeout=10), Delta)
    long_text = "echo " + "x" * 200
    assert collect_reply(engine.submit(request(long_text)))[1].text == "x" * 200
    streaming.cancel()
    assert collect_reply(streaming)[1].finish_reason == "cancelled"  # it streamed throughout
    stream_slot = engine.backend.decode_calls[0][0].slot
    reading_steps = [items for items in engine.backend.decode_calls
                     if any(i.slot != stream_slot and len(i.tokens) > 1 for i in items)]
    assert len(reading_steps) >= 200 // 8
    for items in reading_steps:  # the stream got its token in every step of the long prompt
        assert [len(i.tokens) for i in items if i.slot == stream_slot] == [1]
        assert all(len(i.tokens) <= 8 for i in items if i.slot != stream_slot)


def test_prompts_that_arrive_together_get_their_first_token_in_order(make_engine):
    engine = make_engine(max_sequences=4, batch_tokens=64)
    engine.prefill_chunk = 16  # more than one of these prompts (10 tokens), less than two
    texts = [f"echo {name}" for name in ("ant", "bee", "cat", "dog")]
    generations = [engine.submit(request(text)) for text in texts]
    engine.start()
    assert [collect_reply(g)[1].text for g in generations] == ["ant", "bee", "cat", "dog"]

    def step_of_first_token(text: str) -> int:
        """The decode call that read the end of this prompt (and gave its first logits)."""
        for index, items in enumerate(engine.backend.decode_calls):
            for item in items:
                if item.want_logits and text.encode() in bytes(t for t in item.tokens if t < 256):
                    return index
        raise AssertionError(f"{text} was never read")

    steps = [step_of_first_token(text) for text in texts]
    assert steps == sorted(steps) and len(set(steps)) == 4, steps


def test_cancelled_waiters_free_their_places_in_a_full_queue(make_engine):
    engine = make_engine(queue_size=2, max_sequences=1, step_delay=0.01)
    engine.start()
    running = engine.submit(request("count 500", max_new_tokens=1000))
    assert isinstance(running.next_event(timeout=10), Delta)
    waiting = [engine.submit(request(f"echo waiting {i}")) for i in range(2)]
    with pytest.raises(QueueFull):
        engine.submit(request("echo refused"))
    for generation in waiting:
        generation.cancel()  # the clients left while queued
    admitted = engine.submit(request("echo admitted"))  # at once, not after the running reply
    assert [collect_reply(g)[1].finish_reason for g in waiting] == ["cancelled", "cancelled"]
    running.cancel()
    assert collect_reply(admitted)[1].text == "admitted"


def test_a_request_that_waits_past_the_timeout_ends_without_running(make_engine):
    engine = Engine(FakeBackend(max_sequences=1, step_delay=0.01), "auto", queue_size=4,
                    request_timeout=0.5)
    engine.start()
    try:
        running = engine.submit(request("count 1000", max_new_tokens=5000))
        waiting = engine.submit(request("echo too late"))
        _, done = collect_reply(waiting)
        assert done.finish_reason == "timeout" and done.completion_tokens == 0
        assert collect_reply(running)[1].finish_reason == "timeout"
    finally:
        engine.stop(drain_seconds=1)

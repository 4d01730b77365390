"""Fair and bounded admission (issue 14): preparing and refusing prompts never holds up the
replies that run, a prompt far too long is refused before it is tokenized, and one client
cannot take the whole queue."""

from __future__ import annotations

import threading

import pytest

from tanglebox.admission import MAX_BYTES_PER_TOKEN
from tanglebox.chat_request import ChatRequest
from tanglebox.engine import ClientQueueFull, Delta, Engine, Error
from tanglebox.prompting import USER, Message
from tests.fake_backend import FakeBackend
from tests.live_server import wait_until
from tests.replies import collect_reply

CONTEXT = 4096
FLOODERS = 4
FLOOD_ROUNDS = 10  # prompts per flooder


def request(text: str, client: str = "", max_new_tokens: int = 100_000) -> ChatRequest:
    return ChatRequest((Message(USER, text),), "", 0.0, max_new_tokens, client)


@pytest.fixture
def engine_on():
    engines = []

    def make(backend: FakeBackend, template: str = "auto", **options) -> Engine:
        engine = Engine(backend, template, **options)
        engines.append(engine)
        engine.start()
        return engine

    yield make
    for engine in engines:
        engine.stop(drain_seconds=1)


def test_a_prompt_far_past_the_context_is_refused_without_tokenizing(engine_on):
    backend = FakeBackend(context_length=CONTEXT)
    engine = engine_on(backend)
    huge = "x" * (CONTEXT * MAX_BYTES_PER_TOKEN + 1)
    _, final = collect_reply(engine.submit(request(huge)))
    assert isinstance(final, Error) and final.code == "prompt_too_long"
    assert "bytes" in final.message
    assert "tokenize" not in backend.calls


def test_a_prompt_too_long_in_tokens_is_still_refused_after_tokenizing(engine_on):
    backend = FakeBackend(context_length=CONTEXT)
    engine = engine_on(backend)
    _, final = collect_reply(engine.submit(request("x" * (2 * CONTEXT))))
    assert isinstance(final, Error) and final.code == "prompt_too_long"
    assert "tokens but" in final.message and "tokenize" in backend.calls


def test_clients_flooding_with_too_long_prompts_cannot_stop_a_running_reply(engine_on):
    # Each flood prompt must be tokenized to be refused (bytes under the byte check, tokens
    # over the context), and tokenizing is slow, as llama.cpp's is on a long prompt.
    backend = FakeBackend(context_length=CONTEXT, step_delay=0.002, tokenize_delay=0.02)
    engine = engine_on(backend, queue_size=32)
    victim = engine.submit(request("count 5000", client="victim"))
    deltas: list[str] = []
    reader = threading.Thread(target=lambda: deltas.extend(
        e.text for e in victim.relay() if isinstance(e, Delta)))
    reader.start()
    wait_until(lambda: deltas, what="the victim's first token")

    refusals = []

    def flood(client: str) -> None:
        for _ in range(FLOOD_ROUNDS):
            _, final = collect_reply(engine.submit(request("x" * (2 * CONTEXT), client)))
            refusals.append(final)

    before = len(deltas)
    flooders = [threading.Thread(target=flood, args=(f"flooder{i}",)) for i in range(FLOODERS)]
    for thread in flooders:
        thread.start()
    for thread in flooders:
        thread.join()
    during = len(deltas) - before
    victim.cancel()
    reader.join()

    assert len(refusals) == FLOODERS * FLOOD_ROUNDS
    assert all(isinstance(r, Error) and r.code == "prompt_too_long" for r in refusals)
    # The running reply gets a step between any two prompts prepared.
    assert during >= FLOODERS * FLOOD_ROUNDS // 2, (during, FLOODERS * FLOOD_ROUNDS)


def test_one_client_may_have_only_its_share_of_the_queue(engine_on):
    engine = engine_on(FakeBackend(max_sequences=1, step_delay=0.01), queue_size=10,
                       queue_per_client=2)
    running = engine.submit(request("count 5000", client="a"))
    wait_until(lambda: engine.load()["busy"] == 1, what="the first reply running")
    waiting = [engine.submit(request("echo hi", client="a")) for _ in range(2)]
    with pytest.raises(ClientQueueFull) as refused:
        engine.submit(request("echo hi", client="a"))
    assert refused.value.retry_after > 0
    other = engine.submit(request("echo hi", client="b"))  # another client is still served
    running.cancel()
    for generation in (*waiting, other):
        streamed, _ = collect_reply(generation)
        assert streamed == "hi"


@pytest.mark.parametrize("settings_values", [{"queuePerClient": 1, "parallelSlots": 1}])
@pytest.mark.parametrize("fake_backend", [FakeBackend(max_sequences=1, step_delay=0.01)])
def test_rest_answers_a_client_past_its_share_with_429_and_retry_after(app, client):
    engine = app.extensions["tanglebox"].engine
    running = engine.submit(request("count 5000", client="127.0.0.1"))
    wait_until(lambda: engine.load()["busy"] == 1, what="the first reply running")
    waiting = engine.submit(request("echo hi", client="127.0.0.1"))
    refused = client.post("/conversation", json={"userPrompt": "echo hi"},
                          environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert refused.status_code == 429
    assert int(refused.headers["Retry-After"]) > 0
    assert "requests waiting" in refused.get_data(as_text=True)
    running.cancel()
    waiting.cancel()

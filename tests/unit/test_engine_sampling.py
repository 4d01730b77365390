"""The engine honours a request's sampling options on the fake backend: seeds, logit bias, log
probabilities on the deltas, raw prompts, and grammars (refused, followed, always freed)."""

from __future__ import annotations

import math

import pytest

from tanglebox.chat_request import ChatRequest, SamplingOptions
from tanglebox.engine import Delta, Done, Engine, Error
from tanglebox.prompting import USER, Message
from tests.fake_backend import LETTER_LOGIT, VOCAB, FakeBackend
from tests.live_server import wait_until
from tests.replies import collect_reply
from tests.unit.test_engine_admission import engine_on  # noqa: F401 - the fixture

DIGITS = "root ::= 0123456789 "


def request(text: str, temperature: float = 0.0, max_new_tokens: int = 200, stop=(),
            **options) -> ChatRequest:
    return ChatRequest((Message(USER, text),), "", temperature, max_new_tokens,
                       stop=tuple(stop), sampling=SamplingOptions(**options))


@pytest.fixture
def make_engine(engine_on):
    def make(template: str = "auto", **backend_options) -> Engine:
        return engine_on(FakeBackend(**backend_options), template, default_system_prompt="SYS")

    return make


def reply(engine: Engine, req: ChatRequest) -> Done:
    _, done = collect_reply(engine.submit(req))
    assert isinstance(done, Done), done
    return done


def test_a_request_seed_makes_the_reply_repeatable(make_engine):
    engine = make_engine()
    first = reply(engine, request("letters 30", temperature=1.0, seed=42)).text
    again = reply(engine, request("letters 30", temperature=1.0, seed=42)).text
    other = reply(engine, request("letters 30", temperature=1.0, seed=43)).text
    assert len(first) == 30 and first.isalpha()
    assert first == again
    assert first != other


def test_logit_bias_forbids_and_forces_tokens(make_engine):
    engine = make_engine()
    assert not reply(engine, request("echo Hello", logit_bias=((ord("H"), -100.0),))
                     ).text.startswith("H")
    forced = reply(engine, request("echo Hello", max_new_tokens=5,
                                   logit_bias=((ord("z"), 100.0),)))
    assert forced.text == "zzzzz" and forced.finish_reason == "length"


def test_log_probabilities_ride_with_the_deltas_that_release_their_text(make_engine):
    engine = make_engine()
    generation = engine.submit(request("echo naïve ### tail", stop=("###",), top_logprobs=3))
    events = list(generation.events())
    deltas, done = [e for e in events if isinstance(e, Delta)], events[-1]
    assert isinstance(done, Done) and done.text == "naïve "
    sent = [entry for delta in deltas for entry in delta.logprobs]
    assert tuple(sent) == done.logprobs
    assert len(done.logprobs) == done.completion_tokens  # every reply token once, no end token
    assert b"".join(entry.bytes for entry in done.logprobs) == "naïve ###".encode()
    (i_delta,) = [d for d in deltas if "ï" in d.text]  # ï is two byte tokens: both ride here
    assert [entry.bytes for entry in i_delta.logprobs] == [b"\xc3", b"\xaf"]
    assert [entry.token for entry in i_delta.logprobs] == ["\ufffd", "\ufffd"]
    last = deltas[-1]  # the held-back stop string's tokens come at the end, with no text
    assert last.text == "" and [entry.token for entry in last.logprobs] == ["#", "#", "#"]
    for entry in done.logprobs:
        assert len(entry.top) == 3 and entry.top[0].bytes == entry.bytes
        assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top),
                                                        reverse=True)


def test_log_probabilities_are_the_models(make_engine):
    engine = make_engine()
    done = reply(engine, request("letters 3", top_logprobs=5))
    assert done.text == "aaa"
    expected = LETTER_LOGIT - math.log(26 * math.exp(LETTER_LOGIT) + (VOCAB - 26))
    for entry in done.logprobs:
        assert entry.logprob == pytest.approx(expected, abs=1e-6)
        assert [t.logprob for t in entry.top] == pytest.approx([expected] * 5, abs=1e-6)
        assert all(t.token.isalpha() for t in entry.top)


def test_without_top_logprobs_there_are_none(make_engine):
    engine = make_engine()
    events = list(engine.submit(request("echo plain")).events())
    assert all(event.logprobs == () for event in events if not isinstance(event, Error))


def test_a_raw_prompt_is_used_verbatim(make_engine):
    engine = make_engine("vicuna0")  # a template with a system prompt and a "###" stop
    prompt = "<|user|>echo a ### b<|assistant|>"
    done = reply(engine, ChatRequest((), "", 0.0, 50, prompt_text=prompt))
    assert done.text == "a ### b"  # no template stop string
    read = engine.backend.decode_calls[0][0].tokens
    assert read == engine.backend.tokenize(prompt)  # no template, no system prompt
    assert done.prompt_tokens == len(read)


def test_a_raw_prompt_too_long_in_bytes_is_refused_before_tokenizing(make_engine):
    engine = make_engine(context_length=8)  # 8 tokens: at most 512 bytes
    generation = engine.submit(ChatRequest((), "", 0.0, 5, prompt_text="x" * 600))
    _, error = collect_reply(generation)
    assert isinstance(error, Error) and error.code == "prompt_too_long"
    assert "600 bytes" in error.message
    assert "tokenize" not in engine.backend.calls


def test_a_grammar_on_a_backend_without_grammars_is_an_error(make_engine):
    engine = make_engine()
    _, error = collect_reply(engine.submit(request("echo 12", grammar=DIGITS)))
    assert isinstance(error, Error) and error.code == "grammar"
    assert "fake backend cannot constrain" in error.message
    assert reply(engine, request("echo next")).text == "next"


def test_a_broken_grammar_is_an_error_and_the_engine_serves_on(make_engine):
    engine = make_engine(supports_grammar=True)
    _, error = collect_reply(engine.submit(request("echo 12", grammar="digits please")))
    assert isinstance(error, Error) and error.code == "grammar"
    assert reply(engine, request("echo next")).text == "next"


def test_a_grammar_that_fails_to_load_ends_its_request_only(make_engine):
    engine = make_engine(supports_grammar=True)

    def broken(gbnf: str):
        raise RuntimeError("a native failure")

    engine.backend.grammar = broken
    error = engine.submit(request("echo 12", grammar=DIGITS)).next_event(timeout=10)
    assert isinstance(error, Error) and error.code == "internal"
    assert reply(engine, request("echo next")).text == "next"


def test_the_reply_keeps_to_its_grammar(make_engine):
    engine = make_engine(supports_grammar=True)
    done = reply(engine, request("echo a1b2", grammar=DIGITS))
    assert done.text and set(done.text) <= set("0123456789 ")
    (constraint,) = engine.backend.constraints
    assert constraint.restricted > 0 and constraint.closed


def test_a_grammar_the_reply_keeps_anyway_changes_nothing(make_engine):
    engine = make_engine(supports_grammar=True)
    assert reply(engine, request("count 5", grammar=DIGITS)).text == "1 2 3 4 5"
    (constraint,) = engine.backend.constraints
    assert constraint.restricted == 0  # only the picked tokens were checked


@pytest.mark.parametrize("ending", ["stop", "length", "cancelled"])
def test_the_grammar_is_freed_however_the_reply_ends(make_engine, ending):
    engine = make_engine(supports_grammar=True, step_delay=0.01 if ending == "cancelled" else 0)
    text = "count 5" if ending != "cancelled" else "count 1000"
    generation = engine.submit(request(text, grammar=DIGITS,
                                       max_new_tokens=3 if ending == "length" else 4000))
    if ending == "cancelled":
        assert isinstance(generation.next_event(timeout=10), Delta)
        generation.cancel()
    _, done = collect_reply(generation)
    assert done.finish_reason == ending
    (constraint,) = engine.backend.constraints
    assert constraint.closed


def test_the_grammar_is_freed_when_the_engine_stops(make_engine):
    engine = make_engine(supports_grammar=True, step_delay=0.01)
    generation = engine.submit(request("count 1000", grammar=DIGITS, max_new_tokens=4000))
    wait_until(lambda: engine.backend.constraints, timeout=10)
    engine.stop(drain_seconds=0)
    _, done = collect_reply(generation)
    assert done.finish_reason == "shutdown"
    assert engine.backend.constraints[0].closed

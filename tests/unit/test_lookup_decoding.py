"""Prompt-lookup decoding: what is drafted, that a checked draft changes no reply (greedy:
the same text; sampling: the same distribution), that a run of tokens ends where a step
would, and that a slot whose drafts fail stops drafting."""

from __future__ import annotations

import numpy as np
import pytest

from tanglebox.chat_request import ChatRequest, SamplingOptions
from tanglebox.engine import Done, Engine
from tanglebox.lookup_decoding import (DRAFT_TOKENS, DRAFTING_STREAMS, FIRST_PAUSE,
                                       LookupDecoding, LookupState)
from tanglebox.prompting import USER, Message
from tanglebox.sampling import Sampler
from tests.fake_backend import END, FakeBackend
from tests.replies import collect_reply
from tests.unit.test_engine_admission import engine_on  # noqa: F401 - the fixture

PARAGRAPH = ("The quick brown fox jumps over the lazy dog while the patient farmer counts "
             "his sheep under the old oak tree at the edge of the quiet village.")


def request(text: str, temperature: float = 0.0, max_new_tokens: int = 400, stop=(),
            **options) -> ChatRequest:
    return ChatRequest((Message(USER, text),), "", temperature, max_new_tokens,
                       stop=tuple(stop), sampling=SamplingOptions(**options))


def drafted_steps(backend: FakeBackend) -> int:
    return sum(item.logits_count > 1 for items in backend.decode_calls for item in items)


@pytest.fixture
def reply(engine_on):
    """The reply to a request on a fresh fake engine, lookup decoding on or off, and the
    engine (for its counts and its backend's calls)."""
    def ask(req: ChatRequest, lookup: bool = True, **backend_options) -> tuple[Done, Engine]:
        engine = engine_on(FakeBackend(verifies_drafts=True, **backend_options),
                           lookup_decoding=lookup)
        streamed, done = collect_reply(engine.submit(req))
        assert isinstance(done, Done), done
        assert streamed == done.text
        return done, engine

    return ask


# -- drafts -----------------------------------------------------------------------------

def draft(cached: list[int], last: int, limit: int = 8, state: LookupState | None = None,
          sampler: Sampler | None = None, **backend_options) -> list[int]:
    lookup = LookupDecoding(FakeBackend(verifies_drafts=True, **backend_options))
    state = state or LookupState(length=DRAFT_TOKENS)  # past the first drafts' short length
    return lookup.draft(state, sampler or Sampler(0.0), cached, last, limit)


def test_the_draft_follows_the_most_recent_occurrence_of_the_last_tokens():
    #                 (2, 3) → 9     (2, 3) → 7: more recent     the suffix (2, 3)
    assert draft([1, 2, 3, 9, 5, 2, 3, 7, 8, 4, 2], 3, limit=3) == [7, 8, 4]


def test_a_longer_match_wins_over_a_more_recent_shorter_one():
    assert draft([5, 2, 3, 9, 9, 1, 2, 3, 7, 6, 5, 2], 3, limit=2) == [9, 9]


def test_no_draft_without_an_earlier_occurrence_nor_past_an_end_of_turn():
    assert draft([1, 2, 3], 4) == []
    assert draft([5, 7, 1, 2], 7) == []  # one token in common is too weak a guess
    assert draft([1, 2, 3, 4, END, 7, 1], 2) == [3, 4]


def test_no_draft_where_it_is_off_or_the_sampler_or_backend_cannot_check_one():
    cached, last = [1, 2, 3, 4, 1], 2
    assert draft(cached, last) == [3, 4, 1, 2]
    assert draft(cached, last, sampler=Sampler(0.0, SamplingOptions(top_logprobs=2))) == []
    plain = FakeBackend()  # verifies_drafts False, as the transformers backend
    assert LookupDecoding(plain).draft(LookupState(), Sampler(0.0), cached, last, 8) == []
    off = LookupDecoding(FakeBackend(verifies_drafts=True), enabled=False)
    assert off.draft(LookupState(), Sampler(0.0), cached, last, 8) == []


def test_drafts_grow_while_they_hold_and_pause_then_shrink_when_they_fail():
    lookup = LookupDecoding(FakeBackend(verifies_drafts=True))
    state, sampler = LookupState(), Sampler(0.0)
    tokens = list(b"abcdefghijklmnopqrstuvwxyz") * 2
    first = lookup.draft(state, sampler, tokens[:30], tokens[30], 8)
    assert first == tokens[31:33]  # a slot's first draft is short
    rows = np.zeros((3, 256), dtype=np.float32)
    rows[[0, 1, 2], [first[0], first[1], ord("z")]] = 1.0  # both drafted tokens right
    assert lookup.verify(state, sampler, first, rows) == [*first, ord("z")]
    assert len(lookup.draft(state, sampler, tokens[:32], tokens[32], 8)) == 4
    assert lookup.verify(state, sampler, [1, 2, 3, 4], rows) == [first[0]]  # none right
    for _ in range(FIRST_PAUSE):  # a failed draft: the slot pauses, then drafts one token
        assert lookup.draft(state, sampler, tokens[:33], tokens[33], 8) == []
    assert len(lookup.draft(state, sampler, tokens[:33], tokens[33], 8)) == 1


def test_the_draft_leaves_room_in_the_context():
    assert draft([1, 2, 3, 4, 5, 6, 1], 2, context_length=12) == [3, 4]


# -- exactness ----------------------------------------------------------------------------

def test_a_draft_leaves_the_sampling_distribution_unchanged():
    """The acceptance rule: whichever token is proposed, each token comes as often as without
    a proposal (20,000 draws per proposal; 4 standard errors at most ~0.014)."""
    probabilities = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probabilities).astype(np.float32)
    options = SamplingOptions(top_k=0, top_p=1.0)
    draws = 20_000
    for proposal in range(4):
        sampler = Sampler(1.0, options, seed=proposal)
        counts = np.bincount([sampler.choose(logits, draft=proposal) for _ in range(draws)],
                             minlength=4)
        assert np.abs(counts / draws - probabilities).max() < 0.015, (proposal, counts)


def test_greedy_replies_are_the_same_with_fewer_decodes(reply):
    plain, plain_engine = reply(request("echo " + PARAGRAPH + " " + PARAGRAPH), lookup=False)
    fast, fast_engine = reply(request("echo " + PARAGRAPH + " " + PARAGRAPH))
    assert fast.text == plain.text == PARAGRAPH + " " + PARAGRAPH
    assert fast.completion_tokens == plain.completion_tokens
    assert fast_engine.lookup.accepted > 0 and plain_engine.lookup.drafted == 0
    assert len(fast_engine.backend.decode_calls) < len(plain_engine.backend.decode_calls) / 2


def test_a_stop_string_inside_a_run_ends_the_reply_there(reply):
    text = "echo " + PARAGRAPH + " ### and more " + PARAGRAPH
    plain, _ = reply(request(text, stop=["###"]), lookup=False)
    fast, engine = reply(request(text, stop=["###"]))
    assert fast.text == plain.text == PARAGRAPH + " "
    assert fast.finish_reason == plain.finish_reason == "stop"
    assert engine.lookup.accepted > 0
    # The slot's cache is what the engine records: the next turn in it decodes on.
    _, following = collect_reply(engine.submit(request("echo " + PARAGRAPH)))
    assert following.text == PARAGRAPH


@pytest.mark.parametrize("limit", [1, 7, 20])
def test_the_token_limit_inside_a_run_ends_the_reply_there(reply, limit):
    plain, _ = reply(request("echo " + PARAGRAPH * 2, max_new_tokens=limit), lookup=False)
    fast, _ = reply(request("echo " + PARAGRAPH * 2, max_new_tokens=limit))
    assert fast.text == plain.text == PARAGRAPH[:limit]
    assert fast.completion_tokens == limit and fast.finish_reason == "length"


@pytest.mark.parametrize("context", [380, 383, 386])
def test_the_context_end_inside_a_run_ends_the_reply_there(reply, context):
    plain, _ = reply(request("echo " + PARAGRAPH * 2), lookup=False, context_length=context)
    fast, engine = reply(request("echo " + PARAGRAPH * 2), context_length=context)
    assert fast.finish_reason == plain.finish_reason == "length"
    assert fast.text == plain.text and engine.lookup.accepted > 0


# -- where there are no drafts ------------------------------------------------------------

def test_failing_drafts_back_off(reply):
    """Random letters: a draft's first token is right one time in 26; the slot soon stops
    drafting for longer and longer, so most steps carry no draft."""
    done, engine = reply(request("letters 300", temperature=1.0, seed=7))
    assert len(done.text) == 300
    assert engine.lookup.drafted > 0
    assert drafted_steps(engine.backend) < 40


def test_no_drafts_with_log_probabilities_or_a_grammar(reply):
    text = "echo " + PARAGRAPH * 2
    with_logprobs, engine = reply(request(text, top_logprobs=1))
    assert with_logprobs.text == PARAGRAPH * 2 and drafted_steps(engine.backend) == 0
    constrained, engine = reply(request("echo abcabcabcabcabc", grammar="root ::= abc"),
                                supports_grammar=True)
    assert constrained.text == "abcabcabcabcabc" and drafted_steps(engine.backend) == 0


def test_the_setting_turns_it_off(reply):
    _, engine = reply(request("echo " + PARAGRAPH * 2), lookup=False)
    assert drafted_steps(engine.backend) == 0


def test_a_step_of_many_streams_takes_no_drafts(engine_on):
    """Beside other replies a draft costs on a CPU what their tokens do: of three replies at
    once, the longest drafts only once the others have ended."""
    backend = FakeBackend(verifies_drafts=True, max_sequences=3)
    engine = engine_on(backend)
    texts = ["echo " + PARAGRAPH * n for n in (1, 2, 3)]
    generations = [engine.submit(request(text, max_new_tokens=1000)) for text in texts]
    for generation, text in zip(generations, texts):
        assert collect_reply(generation)[1].text == text[len("echo "):]
    prompt_end: dict[int, int] = {}  # a slot's prompt ends with its first item wanting logits
    for item in (item for items in backend.decode_calls for item in items if item.want_logits):
        prompt_end.setdefault(item.slot, item.position + len(item.tokens))
    crowded = [items for items in backend.decode_calls
               if sum(item.position >= prompt_end[item.slot] for item in items) > DRAFTING_STREAMS]
    assert crowded and all(item.logits_count == 1 for items in crowded for item in items)
    drafted = [items for items in backend.decode_calls if any(i.logits_count > 1 for i in items)]
    assert all(len(items) == 1 for items in drafted)  # not beside a prompt being read either
    assert engine.lookup.accepted > 0  # the last reply, alone, drafted

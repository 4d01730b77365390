"""The per-reply sampler on its own: greedy, seeds, top-k/top-p, penalties, bias, log
probabilities, and the grammar check (one token first, the whole vocabulary only on refusal)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tanglebox.backends.base import GrammarError
from tanglebox.chat_request import SamplingOptions
from tanglebox.sampling import Sampler, token_logprob
from tests.fake_backend import FakeConstraint


def draws(sampler: Sampler, logits: np.ndarray, count: int = 40) -> list[int]:
    return [sampler.choose(logits) for _ in range(count)]


def flat(size: int = 50) -> np.ndarray:
    return np.zeros(size, dtype=np.float32)


def test_temperature_zero_is_the_argmax():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    assert draws(Sampler(0.0), logits, 3) == [int(np.argmax(logits))] * 3


def test_a_request_seed_gives_the_same_draws_and_another_seed_others():
    first = draws(Sampler(1.0, SamplingOptions(seed=7, top_k=0, top_p=1.0)), flat())
    again = draws(Sampler(1.0, SamplingOptions(seed=7, top_k=0, top_p=1.0)), flat())
    other = draws(Sampler(1.0, SamplingOptions(seed=8, top_k=0, top_p=1.0)), flat())
    assert first == again
    assert first != other


def test_the_request_seed_wins_over_the_engine_seed():
    options = SamplingOptions(seed=7)
    assert draws(Sampler(1.0, options, seed=1), flat()) == draws(Sampler(1.0, options, seed=2),
                                                                 flat())
    assert draws(Sampler(1.0, seed=1), flat()) != draws(Sampler(1.0, seed=2), flat())


@pytest.mark.parametrize("seed", [-1, -(2 ** 70), 2 ** 64 + 5, 2 ** 200])
def test_negative_and_huge_seeds_work_and_repeat(seed):
    assert (draws(Sampler(1.0, SamplingOptions(seed=seed)), flat())
            == draws(Sampler(1.0, SamplingOptions(seed=seed)), flat()))


def test_top_k_draws_only_among_the_k_best():
    logits = np.arange(100, dtype=np.float32) / 100  # nearly flat: every token has a chance
    chosen = set(draws(Sampler(1.0, SamplingOptions(top_k=5, top_p=1.0, seed=1)), logits, 200))
    assert chosen == {95, 96, 97, 98, 99}


def test_a_small_top_p_always_draws_the_top_token():
    logits = np.random.default_rng(1).normal(size=300).astype(np.float32)
    chosen = draws(Sampler(1.5, SamplingOptions(top_p=0.01, seed=3)), logits, 100)
    assert set(chosen) == {int(np.argmax(logits))}


def test_top_p_one_and_top_k_off_draw_from_the_whole_vocabulary():
    chosen = draws(Sampler(1.0, SamplingOptions(top_k=0, top_p=1.0, seed=5)), flat(8), 400)
    assert set(chosen) == set(range(8))


def two_favourites() -> np.ndarray:
    logits = flat(10)
    logits[0], logits[1] = 5.0, 4.5
    return logits


@pytest.mark.parametrize("frequency, presence, expected", [
    (0.0, 0.0, [0, 0, 0, 0, 0]),
    # 5 - 0.3 * count: 4.7 > 4.5, then 4.4 < 4.5; then 4.4 > 4.2, then 4.1 < 4.2
    (0.3, 0.0, [0, 0, 1, 0, 1]),
    # 5 - 0.6 once used, whatever the count: 4.4 < 4.5, then 4.4 > 3.9 for good
    (0.0, 0.6, [0, 1, 0, 0, 0]),
])
def test_penalties_follow_openais_formula(frequency, presence, expected):
    logits = two_favourites()
    options = SamplingOptions(frequency_penalty=frequency, presence_penalty=presence)
    assert draws(Sampler(0.0, options), logits, 5) == expected
    assert logits[0] == 5.0 and logits[1] == 4.5  # the model's logits are left as they were


def test_logit_bias_forces_and_forbids_tokens():
    logits = two_favourites()
    forced = Sampler(1.0, SamplingOptions(logit_bias=((7, 100.0),), seed=1))
    assert set(draws(forced, logits)) == {7}
    forbidden = Sampler(0.0, SamplingOptions(logit_bias=((0, -100.0),)))
    assert draws(forbidden, logits, 3) == [1, 1, 1]


def test_logit_bias_ignores_ids_outside_the_vocabulary():
    sampler = Sampler(0.0, SamplingOptions(logit_bias=((-1, 50.0), (10 ** 9, 50.0), (3, 9.0))))
    assert draws(sampler, two_favourites(), 2) == [3, 3]


def token_text(token: int) -> bytes:
    return b"\xc3" if token == 2 else f"t{token}".encode()


def test_log_probabilities_are_the_log_softmax_of_the_raw_logits():
    logits = np.random.default_rng(2).normal(size=64).astype(np.float32) * 3
    expected = logits.astype(np.float64) - np.log(np.exp(logits.astype(np.float64)).sum())
    entry = token_logprob(logits, 5, 4, token_text)
    assert entry.token == "t5" and entry.bytes == b"t5"
    assert math.isclose(entry.logprob, expected[5], rel_tol=1e-9, abs_tol=1e-9)
    best = np.argsort(-expected)[:4]
    assert [t.token for t in entry.top] == [f"t{i}" for i in best]
    assert [t.logprob for t in entry.top] == pytest.approx(expected[best].tolist(), abs=1e-9)
    assert [t.logprob for t in entry.top] == sorted((t.logprob for t in entry.top),
                                                    reverse=True)


def test_log_probabilities_ignore_the_sampling_rules_and_decode_with_replacement():
    logits = two_favourites()
    logits[2] = 4.0
    sampler = Sampler(0.0, SamplingOptions(top_logprobs=0, logit_bias=((2, 10.0),)),
                      token_bytes=token_text)
    assert sampler.choose(logits) == 2
    (entry,) = sampler.logprobs
    plain = token_logprob(logits, 2, 0, token_text)
    assert entry.logprob == plain.logprob < math.log(0.5)  # before the bias: not the favourite
    assert entry.top == () and entry.token == "\ufffd" and entry.bytes == b"\xc3"


def test_without_top_logprobs_nothing_is_kept():
    sampler = Sampler(0.0)
    sampler.choose(two_favourites())
    assert sampler.logprobs == [] and sampler.unsent_logprobs() == ()


def test_the_end_of_turn_token_gets_no_log_probability():
    sampler = Sampler(0.0, SamplingOptions(top_logprobs=2), is_end_of_turn=lambda t: t == 0)
    assert sampler.choose(two_favourites()) == 0
    assert sampler.logprobs == []


def test_unsent_log_probabilities_come_once():
    sampler = Sampler(0.0, SamplingOptions(top_logprobs=1))
    for _ in range(3):
        sampler.choose(two_favourites())
    first = sampler.unsent_logprobs()
    sampler.choose(two_favourites())
    assert len(first) == 3 and len(sampler.unsent_logprobs()) == 1
    assert sampler.unsent_logprobs() == ()


def test_a_grammar_checks_the_picked_token_first_and_masks_only_on_refusal():
    allowed = FakeConstraint(bytes([0, 1]))
    sampler = Sampler(0.0, constraint=allowed)
    assert draws(sampler, two_favourites(), 3) == [0, 0, 0]
    assert allowed.restricted == 0 and allowed.accepted == [0, 0, 0]

    only_five = FakeConstraint(bytes([5]))
    sampler = Sampler(0.8, SamplingOptions(seed=1), constraint=only_five)
    assert draws(sampler, two_favourites(), 3) == [5, 5, 5]
    assert only_five.restricted == 3 and only_five.accepted == [5, 5, 5]


def test_a_grammar_that_allows_nothing_is_a_grammar_error():
    nothing = FakeConstraint(b"")
    nothing.allowed.clear()
    with pytest.raises(GrammarError):
        Sampler(0.0, constraint=nothing).choose(two_favourites())
    assert nothing.accepted == []

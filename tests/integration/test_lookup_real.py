"""Lookup decoding on the real SmolLM2 through llama.cpp: greedy replies are the same token
for token as plain decoding's, on prompts whose replies repeat them (drafts accepted)."""

from __future__ import annotations

import pytest

from tanglebox.backends.llama_cpp_backend import LlamaCppBackend
from tanglebox.chat_request import ChatRequest
from tanglebox.engine import Done, Engine
from tanglebox.model_location import embedded_model_path
from tanglebox.prompting import USER, Message
from tests.replies import collect_reply

pytestmark = pytest.mark.real_model

CODE = """def total(prices, tax):
    result = 0
    for price in prices:
        result = result + price
    return result * (1 + tax)
"""
PROMPTS = (
    "Repeat this code exactly, but rename the function to sum_with_tax:\n\n" + CODE,
    "Copy this text word for word: The quick brown fox jumps over the lazy dog. The quick "
    "brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
)


@pytest.fixture(scope="module")
def engines():
    made = {}
    for lookup in (False, True):
        engine = Engine(LlamaCppBackend(embedded_model_path(), 1024, 2, 0, "cpu"), "auto",
                        lookup_decoding=lookup)
        engine.start()
        made[lookup] = engine
    yield made
    for engine in made.values():
        engine.stop(drain_seconds=5)


def ask(engine: Engine, prompt: str) -> Done:
    _, done = collect_reply(engine.submit(ChatRequest((Message(USER, prompt),), "", 0.0, 160)))
    assert isinstance(done, Done), done
    return done


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_replies_are_identical_with_drafts_accepted(engines, prompt):
    accepted_before = engines[True].lookup.accepted
    plain = ask(engines[False], prompt)
    fast = ask(engines[True], prompt)
    assert fast.text == plain.text
    assert fast.completion_tokens == plain.completion_tokens
    assert fast.finish_reason == plain.finish_reason
    assert engines[True].lookup.accepted > accepted_before  # not vacuous: drafts were used
    assert engines[False].lookup.drafted == 0

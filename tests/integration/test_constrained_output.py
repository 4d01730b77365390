"""Grammar-constrained replies on the real SmolLM2-135M-Instruct (llama.cpp backend).

The grammars are the ones the OpenAI adapter makes from ``response_format``: llama-cpp-python's
``JSON_GBNF`` for ``json_object``, ``json_schema_to_gbnf`` for ``json_schema``. The model does
not write JSON this reliably on its own; under the grammar every reply that ends parses.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

from tanglebox.backends import load_backend
from tanglebox.chat_request import ChatRequest, SamplingOptions
from tanglebox.engine import Done, Engine, Error
from tanglebox.model_location import locate_model
from tanglebox.prompting import USER, Message
from tanglebox.settings import load_settings
from tests.replies import collect_reply

pytestmark = pytest.mark.real_model

LENGTH_SCHEMA = {"type": "object",
                 "properties": {"answer": {"type": "integer"}, "unit": {"enum": ["cm", "m"]}},
                 "required": ["answer", "unit"]}
ANY_TEXT = r"root ::= [^\x00]*"  # every token the model picks satisfies it


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    settings = load_settings(tmp_path_factory.mktemp("settings") / "settings.json",
                             {"backend": "llama.cpp", "contextLength": 1024,
                              "parallelSlots": 2})
    engine = Engine(load_backend(settings, locate_model(settings)), "auto", seed=1234)
    engine.start()
    yield engine
    engine.stop(drain_seconds=5)


def chat(question: str, temperature: float = 0.0, max_new_tokens: int = 200,
         **options) -> ChatRequest:
    return ChatRequest((Message(USER, question),), "", temperature, max_new_tokens,
                       sampling=SamplingOptions(**options))


def ask(engine: Engine, request: ChatRequest) -> Done:
    streamed, done = collect_reply(engine.submit(request))
    assert isinstance(done, Done), done
    assert streamed == done.text
    return done


@pytest.mark.parametrize("question, temperature, seed", [
    ("What is the capital of France? Answer in JSON.", 0.0, None),
    ("Describe a dog in JSON with its name and age.", 0.0, None),
    ("What is the capital of France? Answer in JSON.", 0.8, 3),
    ("Describe a dog in JSON with its name and age.", 0.8, 1),
    ("Describe a dog in JSON with its name and age.", 0.8, 2),
])
def test_json_mode_replies_parse_as_json(engine, question, temperature, seed):
    done = ask(engine, chat(question, temperature, grammar=JSON_GBNF, seed=seed))
    assert done.finish_reason == "stop", done.text
    assert isinstance(json.loads(done.text), dict)


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (0.8, 5)])
def test_a_schema_grammar_gives_replies_that_validate(engine, temperature, seed):
    grammar = json_schema_to_gbnf(json.dumps(LENGTH_SCHEMA))
    done = ask(engine, chat("How long is a pencil?", temperature, grammar=grammar, seed=seed))
    assert done.finish_reason == "stop", done.text
    answer = json.loads(done.text)
    assert set(answer) == {"answer", "unit"}
    assert isinstance(answer["answer"], int) and answer["unit"] in ("cm", "m")


def test_two_constrained_replies_side_by_side_each_keep_their_grammar(engine):
    schema = json_schema_to_gbnf(json.dumps(LENGTH_SCHEMA))
    together = [engine.submit(chat("How long is a pencil?", grammar=schema)),
                engine.submit(chat("Describe a dog in JSON with its name and age.",
                                   grammar=JSON_GBNF))]
    pencil, dog = (collect_reply(generation)[1] for generation in together)
    assert set(json.loads(pencil.text)) == {"answer", "unit"}
    assert isinstance(json.loads(dog.text), dict)


def test_a_broken_grammar_is_an_error_and_the_engine_serves_on(engine):
    _, error = collect_reply(engine.submit(chat("Hello", grammar="root ::= (((")))
    assert isinstance(error, Error) and error.code == "grammar"
    assert "GBNF" in error.message
    assert ask(engine, chat("What is 2 + 2?", max_new_tokens=32)).text


def test_a_grammar_every_greedy_token_keeps_changes_nothing(engine):
    plain = ask(engine, chat("What is the capital of France?", max_new_tokens=60))
    constrained = ask(engine, chat("What is the capital of France?", max_new_tokens=60,
                                   grammar=ANY_TEXT))
    assert constrained.text == plain.text


def test_the_cost_of_a_grammar(engine):
    """Measured, not asserted (speed belongs to the benchmark): tokens/s of a greedy reply
    without a grammar, with one every token passes (the one-token check only), and in JSON
    mode (the whole vocabulary masked at each refused pick); and the two checks alone."""
    question = "Write a short story about a dragon, as JSON."
    rates = {}
    for name, grammar in (("none", None), ("any text", ANY_TEXT), ("JSON", JSON_GBNF)):
        done = ask(engine, chat(question, max_new_tokens=80, grammar=grammar))
        rates[name] = (done.completion_tokens, done.timings["tokensPerSecond"])
    backend = engine.backend  # the engine is idle between requests: safe to use here
    grammar = backend.grammar(JSON_GBNF)
    try:
        logits = np.zeros(backend._n_vocab, dtype=np.float32)
        start = time.perf_counter()
        for _ in range(200):
            grammar.allows(90)  # "{"
        one = (time.perf_counter() - start) / 200
        start = time.perf_counter()
        for _ in range(10):
            grammar.restrict(logits)
        whole = (time.perf_counter() - start) / 10
    finally:
        grammar.close()
    print(f"\ngrammar cost: (tokens, tokens/s) {rates}; one-token check {one * 1e6:.0f} us, "
          f"whole vocabulary {whole * 1e3:.2f} ms")

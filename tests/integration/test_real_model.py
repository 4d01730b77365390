"""The engine on the real SmolLM2-135M-Instruct, through both local backends, at temperature 0.

The transformers backend loads the very same GGUF file (transformers' ``gguf_file`` loading),
so both answer the same questions with the same chat template.
"""

from __future__ import annotations

import pytest

from tanglebox.backends import load_backend
from tanglebox.backends.base import DecodeItem
from tanglebox.backends.llama_cpp_backend import BATCH_TOKENS, LlamaCppBackend
from tanglebox.chat_request import ChatRequest
from tanglebox.engine import Done, Engine
from tanglebox.model_location import embedded_model_path, locate_model
from tanglebox.prompting import USER, Message
from tanglebox.settings import load_settings
from tests.replies import collect_reply

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module", params=["llama.cpp", "transformers"])
def engine(request, tmp_path_factory):
    settings = load_settings(tmp_path_factory.mktemp("settings") / "settings.json",
                             {"backend": request.param, "contextLength": 1024,
                              "parallelSlots": 2})
    backend = load_backend(settings, locate_model(settings))
    engine = Engine(backend, "auto", seed=1234)
    engine.start()
    yield engine
    engine.stop(drain_seconds=5)


def ask(engine: Engine, question: str, max_new_tokens: int = 64) -> tuple[str, Done]:
    generation = engine.submit(ChatRequest((Message(USER, question),), "", 0.0, max_new_tokens))
    streamed, done = collect_reply(generation)
    assert isinstance(done, Done), done
    return streamed, done


def test_answers_arithmetic(engine):
    streamed, done = ask(engine, "What is 2 + 2?")
    assert "4" in done.text
    assert done.finish_reason == "stop"
    assert done.prompt_tokens > 0 and done.completion_tokens > 0


def test_streamed_text_equals_the_final_text_and_is_repeatable(engine):
    first_stream, first = ask(engine, "Name three colours.")
    second_stream, second = ask(engine, "Name three colours.")
    assert first_stream == first.text
    assert second.text == first.text  # temperature 0 is greedy: the same reply twice
    assert second.cached_tokens > 0  # and the repeated prompt came from the KV cache


def test_max_new_tokens_is_honoured(engine):
    _, done = ask(engine, "Write a long story about a dragon.", max_new_tokens=5)
    assert done.finish_reason == "length"
    assert done.completion_tokens == 5


def test_a_stop_string_never_leaks(engine):
    _, full = ask(engine, "What is 2 + 2?")
    words = full.text.split()
    assert len(words) >= 3, full.text
    stop = " " + words[2]  # a string this model produces at temperature 0, split over tokens
    generation = engine.submit(ChatRequest((Message(USER, "What is 2 + 2?"),), "", 0.0, 64,
                                           stop=(stop,)))
    streamed, done = collect_reply(generation)
    assert done.finish_reason == "stop"
    assert streamed == done.text == full.text[:full.text.index(stop)]
    assert stop not in streamed


def test_a_decode_over_the_batch_size_is_refused_and_the_backend_still_works():
    backend = LlamaCppBackend(embedded_model_path(), 1024, 2, 0, "cpu")
    try:
        prompt = backend.tokenize("What is 2 + 2?")
        fresh = backend.decode([DecodeItem(0, prompt, 0)])[0].copy()
        too_many = [DecodeItem(1, [prompt[-1]] * (BATCH_TOKENS // 2 + 1), 0),
                    DecodeItem(1, [prompt[-1]] * (BATCH_TOKENS // 2), 0)]
        with pytest.raises(ValueError, match="over the batch size"):
            backend.decode(too_many)
        backend.forget(0, 0)
        again = backend.decode([DecodeItem(0, prompt, 0)])[0]
        assert int(again.argmax()) == int(fresh.argmax())
    finally:
        backend.close()


def test_each_item_gets_its_own_logits_whatever_the_order_of_the_slots():
    """The backend hands llama.cpp the batch in slot order (out-of-order sequence ids split a
    step into several decodes); each item must still get the logits of its own sequence."""
    backend = LlamaCppBackend(embedded_model_path(), 256, 3, 0, "cpu")
    try:
        prompts = [backend.tokenize(text) for text in
                   ("What is 2 + 2?", "Name a colour.", "Write a word that rhymes with cat.")]
        alone = []
        for slot, prompt in enumerate(prompts):
            alone.append(backend.decode([DecodeItem(slot, prompt, 0)])[0].copy())
            backend.forget(slot, 0)
        # slot 2, nothing for slot 1 (no logits wanted), then slot 0
        items = [DecodeItem(2, prompts[2], 0), DecodeItem(1, prompts[1], 0, want_logits=False),
                 DecodeItem(0, prompts[0], 0)]
        together = backend.decode(items)
        assert together[1] is None
        for logits, slot in ((together[0], 2), (together[2], 0)):
            assert int(logits.argmax()) == int(alone[slot].argmax())
            assert abs(logits - alone[slot]).max() < 1e-2 * abs(alone[slot]).max()
    finally:
        backend.close()

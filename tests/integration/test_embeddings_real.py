"""Embeddings on the real SmolLM2-135M-Instruct (llama.cpp; one comparison with transformers
on the same GGUF file): what the vectors are, what they mean, the errors, and that embedding
never holds up the web's greenlets or the engine's replies."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import llama_cpp
import numpy as np
import pytest

from tanglebox.backends.llama_cpp_backend import LlamaCppBackend, cpu_threads
from tanglebox.backends.llama_cpp_embeddings import BATCH_TOKENS, LlamaCppEmbeddings
from tanglebox.chat_request import ChatRequest
from tanglebox.client_json import RequestError
from tanglebox.embeddings import Embedder
from tanglebox.engine import Done, Engine
from tanglebox.model_location import embedded_model_path
from tanglebox.prompting import USER, Message
from tanglebox.runtime import Refusal, Refused
from tests.conftest import ROOT
from tests.replies import collect_reply

pytestmark = pytest.mark.real_model

CONTEXT = 1024
SENTENCES = [f"Sentence number {i} is about {topic}." for i, topic in enumerate(
    ["cats", "the weather", "trains", "cooking pasta", "the sea", "music", "chess", "gardens",
     "rockets", "bread", "winter", "painting", "bicycles", "coffee", "mountains", "books"])]


@pytest.fixture(scope="module")
def backend():
    loaded = LlamaCppBackend(embedded_model_path(), CONTEXT, 2, 0, "cpu")
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def embedder(backend):
    return Embedder(backend)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)  # unit vectors


def test_vectors_have_the_models_dimension_unit_length_and_are_repeatable(backend, embedder):
    started = time.perf_counter()
    first = embedder.embed(SENTENCES)
    print(f"\n16 short sentences ({first.prompt_tokens} tokens): "
          f"{time.perf_counter() - started:.2f} s on {cpu_threads()} CPU threads")
    assert first.dimensions == llama_cpp.llama_model_n_embd(backend._model) == 576
    assert len(first.vectors) == len(SENTENCES)
    for vector in first.vectors:
        assert vector.shape == (576,) and vector.dtype == np.float32
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    again = embedder.embed(SENTENCES)
    for a, b in zip(first.vectors, again.vectors):
        np.testing.assert_array_equal(a, b)


def test_a_sentence_is_closer_to_its_paraphrase_than_to_an_unrelated_one(embedder):
    cat, paraphrase, unrelated = embedder.embed(
        ["The cat sat on the mat.", "A cat was sitting on the rug.",
         "Stock markets fell sharply on Tuesday."]).vectors
    assert cosine(cat, paraphrase) > cosine(cat, unrelated)


def test_a_batch_gives_the_vectors_of_one_by_one(embedder):
    """llama.cpp's CPU kernels round a little differently for batches of different sizes
    (the engine's logits test allows 1e-2 for that): the same vectors, to within 1e-2 in any
    component, and cosines above 0.9999."""
    together = embedder.embed(SENTENCES[:6]).vectors
    alone = [embedder.embed([text]).vectors[0] for text in SENTENCES[:6]]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-2)
        assert cosine(a, b) > 0.9999


def test_the_token_count_is_what_the_models_tokenizer_reads(backend, embedder):
    """As the engine counts a prompt's tokens (a BOS where the model adds one: SmolLM2 does
    not)."""
    texts = ["Hello, world!", "Ünïcödé text ✓", SENTENCES[3]]
    expected = [len(backend.tokenize(text)) for text in texts]
    assert embedder.embed(texts).prompt_tokens == sum(expected)
    assert embedder.embed(texts[:1]).prompt_tokens == expected[0]


def test_an_input_longer_than_the_context_is_refused_naming_it(embedder):
    with pytest.raises(RequestError) as caught:
        embedder.embed(["short", "word " * (CONTEXT + 10)])
    assert caught.value.param == "input[1]"
    assert f"{CONTEXT + 11} tokens" in str(caught.value) and str(CONTEXT) in str(caught.value)


def test_an_empty_input_is_refused(embedder):
    with pytest.raises(RequestError) as caught:
        embedder.embed(["fine", ""])
    assert caught.value.param == "input[1]" and "empty" in str(caught.value)


def test_the_mean_equals_llama_cpps_own_mean_pooling_also_over_several_decodes(backend,
                                                                                embedder):
    """The embedder reads a long input in pieces of BATCH_TOKENS and takes the mean itself;
    llama.cpp's LLAMA_POOLING_TYPE_MEAN reads each input whole (see llama_cpp_embeddings)."""
    long_text = " ".join(SENTENCES) * 6
    texts = [SENTENCES[0], long_text, SENTENCES[1]]
    assert BATCH_TOKENS < len(backend.tokenize(long_text)) <= CONTEXT
    ours = embedder.embed(texts).vectors
    reference = LlamaCppEmbeddings(backend._model, CONTEXT, cpu_threads(),
                                   llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    try:
        assert reference.pooled
        theirs = reference.embed_tokens([reference.tokenize(text) for text in texts])
    finally:
        reference.close()
    for a, b in zip(ours, theirs):  # batches of other sizes round a little differently
        np.testing.assert_allclose(a, b / np.linalg.norm(b), atol=2e-3)
        assert cosine(a, b / np.linalg.norm(b)) > 0.9999


def test_closing_the_backend_closes_the_embeddings_and_refuses_as_shutting_down():
    backend = LlamaCppBackend(embedded_model_path(), 256, 1, 0, "cpu")
    embedder = Embedder(backend)
    assert embedder.embed(["before"]).dimensions == 576
    context = backend.open_embeddings()
    backend.close()
    assert context.closed
    with pytest.raises(Refused) as caught:
        embedder.embed(["after"])
    assert caught.value.reason == Refusal.SHUTTING_DOWN


def test_a_reply_and_an_embedding_at_once_both_finish():
    backend = LlamaCppBackend(embedded_model_path(), 512, 1, 0, "cpu")
    engine = Engine(backend, "auto")  # the engine's context and the embeddings' on one model
    engine.start()
    request = ChatRequest((Message(USER, "What is the capital of France?"),), "", 0.0, 16)
    try:
        _, alone = collect_reply(engine.submit(request))
        generation = engine.submit(request)
        vectors = Embedder(backend).embed(SENTENCES * 2).vectors
        _, done = collect_reply(generation)
    finally:
        engine.stop(drain_seconds=5, wait=True)
    assert isinstance(done, Done) and done.text == alone.text and done.completion_tokens > 0
    assert len(vectors) == 32


# Under gevent, as the server runs: a ticker greenlet, a reply, and an embedding of 64
# sentences at once. Computing in the greenlet would freeze the hub for the whole embedding.
GEVENT_SCRIPT = textwrap.dedent("""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from tanglebox.backends.llama_cpp_backend import LlamaCppBackend
    from tanglebox.chat_request import ChatRequest
    from tanglebox.embeddings import Embedder
    from tanglebox.engine import Delta, Engine
    from tanglebox.model_location import embedded_model_path
    from tanglebox.prompting import USER, Message

    backend = LlamaCppBackend(embedded_model_path(), 512, 1, 0, "cpu")
    engine = Engine(backend, "auto")
    engine.start()
    embedder = Embedder(backend)
    ticks = []
    def ticker():
        while True:
            ticks.append(1)
            gevent.sleep(0.001)
    def embed():
        before = len(ticks)
        result = embedder.embed([f"Sentence {i} about something else." for i in range(64)])
        return len(result.vectors), len(ticks) - before
    def reply():
        generation = engine.submit(ChatRequest(
            (Message(USER, "What is the capital of France?"),), "", 0.0, 16))
        return "".join(e.text for e in generation.events() if isinstance(e, Delta))
    alone = reply()
    tick = gevent.spawn(ticker)
    jobs = [gevent.spawn(embed), gevent.spawn(reply)]
    gevent.joinall(jobs)
    tick.kill()
    engine.stop(drain_seconds=1)
    (vectors, ticked), text = jobs[0].value, jobs[1].value
    print(vectors, ticked > 0, text == alone != "")
""")


def test_greenlets_keep_running_while_a_large_batch_embeds_beside_a_reply():
    result = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["64", "True", "True"], result.stdout + result.stderr


def test_transformers_gives_nearly_the_vectors_of_llama_cpp(tmp_path, embedder):
    """Both backends load the same GGUF file and mean-pool the same tensor (the last hidden
    state after the final norm); llama.cpp computes with 4-bit weights and 8-bit activations,
    transformers with the weights dequantized to fp32."""
    pytest.importorskip("transformers")
    from tanglebox.backends import load_backend
    from tanglebox.model_location import locate_model
    from tanglebox.settings import load_settings
    settings = load_settings(tmp_path / "settings.json",
                             {"backend": "transformers", "contextLength": CONTEXT})
    transformers_backend = load_backend(settings, locate_model(settings))
    try:
        theirs = Embedder(transformers_backend).embed(SENTENCES[:4])
    finally:
        transformers_backend.close()
    ours = embedder.embed(SENTENCES[:4])
    assert theirs.dimensions == ours.dimensions
    assert theirs.prompt_tokens == ours.prompt_tokens
    for a, b in zip(ours.vectors, theirs.vectors):
        assert cosine(a, b) > 0.98

"""Embeddings without the real model: the embedder's contract (order, unit vectors, token
counts, the errors that name an input, the bounded queue, a model that cannot embed, the end
with the engine) on a scripted embedding model, and the transformers path's mean pooling on
the tiny random Llama. The real model on both backends: tests/integration/test_embeddings_real.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from tanglebox.backends.base import BackendError
from tanglebox.client_json import RequestError
from tanglebox.embeddings import QUEUE_SIZE, Embedder, Embeddings, EmbeddingsUnsupported
from tanglebox.engine import Engine
from tanglebox.runtime import QUEUE_FULL_MESSAGE, Refusal, Refused, Runtime
from tests.fake_backend import FakeBackend

DEADLINE = 30.0


class ScriptedEmbeddingModel:
    """Tokens are the text's bytes after a BOS (0); the vector of an input is (its token count,
    its first byte, 1), so a test can tell the inputs' vectors apart. ``hold`` makes a call
    wait until it is set, so a test can fill the queue behind it."""

    def __init__(self, context_length: int) -> None:
        self.context_length = context_length
        self.dimensions = 3
        self.closed = False
        self.hold = threading.Event()
        self.hold.set()
        self.running = threading.Event()
        self.calls: list[list[list[int]]] = []

    def tokenize(self, text: str) -> list[int]:
        return [0, *text.encode("utf-8")]

    def embed_tokens(self, inputs: list[list[int]]) -> list[np.ndarray]:
        if self.closed:
            raise BackendError("closed")
        self.running.set()
        assert self.hold.wait(DEADLINE)
        self.calls.append(inputs)
        return [np.array([len(tokens), tokens[1], 1.0], dtype=np.float32) for tokens in inputs]

    def close(self) -> None:
        self.closed = True


class EmbeddingFakeBackend(FakeBackend):
    """The fake backend with ``open_embeddings``; closing it closes the embedding model, as
    LlamaCppBackend.close closes its embeddings context."""

    def __init__(self, model: ScriptedEmbeddingModel | None = None,
                 open_error: str = "", **kwargs) -> None:
        super().__init__(**kwargs)
        self.embedding_model = model or ScriptedEmbeddingModel(self.context_length)
        self.open_error = open_error
        self.opened = 0

    def open_embeddings(self) -> ScriptedEmbeddingModel:
        self.opened += 1
        if self.open_error:
            raise BackendError(self.open_error)
        return self.embedding_model

    def close(self) -> None:
        self.embedding_model.close()
        super().close()


def wait_until(condition, what: str) -> None:
    deadline = threading.Event()
    timer = threading.Timer(DEADLINE, deadline.set)
    timer.start()
    try:
        while not condition():
            assert not deadline.wait(0.01), f"timed out waiting for {what}"
    finally:
        timer.cancel()


# -- the contract ---------------------------------------------------------------------------


def test_vectors_are_unit_length_in_input_order_with_the_tokens_counted():
    embedder = Embedder(EmbeddingFakeBackend())
    result = embedder.embed(["b", "abc", "héllo"])
    assert isinstance(result, Embeddings)
    assert result.dimensions == 3
    assert result.prompt_tokens == 2 + 4 + 7  # a BOS each, and "é" is two bytes
    for vector, (count, first) in zip(result.vectors, [(2, ord("b")), (4, ord("a")),
                                                       (7, ord("h"))]):
        assert vector.dtype == np.float32
        assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-6)
        expected = np.array([count, first, 1.0]) / np.linalg.norm([count, first, 1.0])
        np.testing.assert_allclose(vector, expected, rtol=1e-6)


@pytest.mark.parametrize("texts, param, words", [
    ([], "input", ["empty"]),
    (["ok", ""], "input[1]", ["empty"]),
    (["x" * 64, "ok"], "input[0]", ["65 tokens", "64"]),  # BOS + 64 bytes; context 64
    (["ok", "x" * (64 * 64 + 1)], "input[1]", ["4097 bytes", "64 tokens"]),  # never tokenized
])
def test_bad_inputs_are_refused_naming_the_input(texts, param, words):
    backend = EmbeddingFakeBackend(context_length=64)
    with pytest.raises(RequestError) as caught:
        Embedder(backend).embed(texts)
    assert caught.value.param == param
    for word in words:
        assert word in str(caught.value)
    assert backend.embedding_model.calls == []


def test_too_many_waiting_requests_are_refused_at_once_with_the_engines_sentence():
    model = ScriptedEmbeddingModel(64)
    model.hold.clear()
    embedder = Embedder(EmbeddingFakeBackend(model))
    results: list[Embeddings | Exception] = []

    def embed(text: str) -> None:
        try:
            results.append(embedder.embed([text]))
        except Exception as err:  # noqa: BLE001 - the test looks at what came back
            results.append(err)

    threads = [threading.Thread(target=embed, args=("run",))]
    try:
        threads[0].start()
        wait_until(model.running.is_set, "the first request to run")
        for i in range(QUEUE_SIZE):
            threads.append(threading.Thread(target=embed, args=(f"wait {i}",)))
            threads[-1].start()
        wait_until(lambda: len(embedder._jobs) == QUEUE_SIZE, "the queue to fill")

        one_more = threading.Thread(target=embed, args=("one too many",))
        one_more.start()
        one_more.join(DEADLINE)  # refused at once: never waits for the running request
        assert results and isinstance(results[0], Refused), "the request waited in the queue"
    finally:
        model.hold.set()
    refused = results[0]
    assert refused.reason == Refusal.QUEUE_FULL
    assert refused.message == QUEUE_FULL_MESSAGE
    assert refused.retry_after > 0 and refused.status == 503

    for thread in threads:
        thread.join(DEADLINE)
    assert [type(r) for r in results[1:]] == [Embeddings] * (QUEUE_SIZE + 1)
    assert embedder.embed(["room again"]).dimensions == 3


def test_a_backend_without_embeddings_is_a_sentence_for_users(app):
    """The fake backend, like any backend without ``open_embeddings``."""
    embedder = app.extensions["tanglebox"].embedder()
    with pytest.raises(EmbeddingsUnsupported) as caught:
        embedder.embed(["hello"])
    message = str(caught.value)
    assert "fake-model" in message and "cannot make embeddings" in message
    assert message.endswith(".") and "\n" not in message


def test_a_model_that_fails_to_open_is_unsupported_and_not_retried():
    backend = EmbeddingFakeBackend(open_error="llama.cpp could not create an embeddings context")
    embedder = Embedder(backend)
    for _ in range(2):
        with pytest.raises(EmbeddingsUnsupported) as caught:
            embedder.embed(["hello"])
        assert "could not create an embeddings context" in str(caught.value)
        assert "fake-model" in str(caught.value)
    assert backend.opened == 1


# -- one per runtime, closed with the engine --------------------------------------------------


def test_the_runtime_makes_one_embedder_and_it_ends_with_the_engine(tmp_path):
    from tanglebox.settings import load_settings
    backend = EmbeddingFakeBackend()
    engine = Engine(backend, "auto")
    engine.start()
    runtime = Runtime(load_settings(tmp_path / "settings.json"))
    with pytest.raises(Refused) as loading:
        runtime.embedder()
    assert loading.value.reason == Refusal.LOADING
    runtime.attach_engine(engine)
    embedder = runtime.embedder()
    assert runtime.embedder() is embedder
    assert embedder.embed(["before"]).prompt_tokens == 7

    engine.stop(drain_seconds=1)
    assert backend.embedding_model.closed  # the engine closed its backend, and the model with it
    with pytest.raises(Refused) as caught:
        runtime.embedder().embed(["after"])
    assert caught.value.reason == Refusal.SHUTTING_DOWN


# -- transformers: mean pooling on the tiny random Llama ---------------------------------------


@pytest.fixture(scope="module")
def tiny_backend(tmp_path_factory):
    pytest.importorskip("transformers")
    from tanglebox.backends.transformers.backend import TransformersBackend
    from tanglebox.model_location import ModelLocation
    from tests.loading_plans import settings_for
    from tests.tiny_llama import save_tiny_llama
    folder = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    backend = TransformersBackend.load(settings_for(tmp_path_factory.mktemp("settings")),
                                       ModelLocation(folder, "transformers", False))
    yield backend
    backend.close()


TEXTS = ["hello world", "a", "héllo wörld, a somewhat longer sentence than the others", "two"]


def test_transformers_vectors_are_the_mean_of_the_last_hidden_state(tiny_backend):
    torch = pytest.importorskip("torch")
    result = Embedder(tiny_backend).embed(TEXTS)
    assert result.dimensions == tiny_backend.model.config.hidden_size == len(result.vectors[0])
    assert result.prompt_tokens == sum(len(tiny_backend.tokenize(text)) for text in TEXTS)
    with torch.no_grad():
        for text, vector in zip(TEXTS, result.vectors):
            ids = torch.tensor([tiny_backend.tokenize(text)])
            hidden = tiny_backend.model.model(input_ids=ids).last_hidden_state[0]
            expected = hidden.mean(dim=0).numpy()
            np.testing.assert_allclose(vector, expected / np.linalg.norm(expected),
                                       rtol=1e-4, atol=1e-5)


def test_transformers_batch_equals_one_by_one(tiny_backend):
    embedder = Embedder(tiny_backend)
    together = embedder.embed(TEXTS).vectors
    alone = [embedder.embed([text]).vectors[0] for text in TEXTS]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert len({tuple(np.round(v, 4)) for v in together}) == len(TEXTS)

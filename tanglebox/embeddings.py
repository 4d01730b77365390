"""Embeddings: one vector per text, from the served model, on a thread of their own.

Flow of a request (``POST /v1/embeddings`` calls ``runtime.embedder().embed(texts)``)::

    adapter's greenlet ── embed(texts) ──► checks that need no model: no inputs, an empty
                                           one, one far past the context in bytes (RequestError)
                                      ──► a bounded FIFO queue (full: Refused QUEUE_FULL)
    embedding thread (a real OS thread) ◄──┘
      first job: backend.open_embeddings(): llama.cpp opens a second context on the loaded
                 model; transformers pools the same model's hidden states. A backend that has
                 none, or fails to open it: EmbeddingsUnsupported, for this and every later call
      each job:  tokenize with the model's tokenizer (BOS as it adds it), refuse an input
                 longer than the context (RequestError naming input[i]), pool, L2-normalise
                 (unit vectors, as OpenAI's are: a dot product is the cosine)
      answer:    through a handoff.EventChannel, so the waiting greenlet never blocks the hub

The thread is not the engine's: a batch of embeddings would stall every streaming reply for
its whole length, while a context of its own computes beside the engine's (ctypes and torch
release the GIL). It is one thread, started at the first request, taking jobs in order.

The embedder ends with the engine: the engine's last act closes its backend, which closes
what ``open_embeddings`` opened (after a decode in progress); from then on every request is
refused as shutting down, and the thread ends (as it does after a minute with no work; the
next request starts another).
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from tanglebox import handoff
from tanglebox.backends.base import BackendError
from tanglebox.client_json import RequestError
from tanglebox.admission import MAX_BYTES_PER_TOKEN
from tanglebox.generation import SHUTTING_DOWN
from tanglebox.runtime import QUEUE_FULL_MESSAGE, SHUTDOWN_RETRY_AFTER, Refusal, Refused

log = logging.getLogger(__name__)

QUEUE_SIZE = 8  # embedding requests waiting behind the running one; more are refused
RETRY_AFTER = 2  # seconds, when the queue is full
MAX_INPUTS = 2048  # per request, as OpenAI's API allows
IDLE_POLL_SECONDS = 0.5  # how often an idle embedding thread looks whether the model closed
IDLE_EXIT_SECONDS = 60.0  # then the thread ends; the next request starts another

EMBEDDING_FAILED = "The model failed to make embeddings; please try again."


@dataclass(frozen=True)
class Embeddings:
    vectors: list[np.ndarray]  # float32, unit length (L2), one per input, in input order
    prompt_tokens: int  # tokens read over all inputs
    dimensions: int


class EmbeddingsUnsupported(Exception):
    """This model cannot make embeddings; ``str(err)`` is a sentence for users saying why."""


class EmbeddingModel(Protocol):
    """What a backend's ``open_embeddings()`` returns; used by the embedding thread only."""

    context_length: int  # the most tokens one input may have
    dimensions: int
    closed: bool  # the backend has been closed: no more embeddings

    def tokenize(self, text: str) -> list[int]:
        ...

    def embed_tokens(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """One vector per token list, in order, not normalised."""

    def close(self) -> None:
        ...


@dataclass(eq=False)
class _Job:
    texts: list[str]
    channel: handoff.EventChannel
    cancelled: bool = False  # the caller has gone: skip it


class Embedder:
    """Embeds texts with the backend's model on one embedding thread (see the module)."""

    def __init__(self, backend: Any, queue_size: int = QUEUE_SIZE) -> None:
        self.backend = backend
        self.queue_size = queue_size
        self._jobs: collections.deque[_Job] = collections.deque()
        self._lock = handoff.native_lock()  # the jobs and the flags below
        self._wakeup = handoff.Wakeup()
        self._started = False  # the embedding thread runs
        self._model: EmbeddingModel | None = None
        self._unsupported = ""  # why this model cannot embed, once known
        if not hasattr(backend, "open_embeddings"):
            self._unsupported = self._cannot(f"its backend ({backend.name}) has none")

    def embed(self, texts: list[str]) -> Embeddings:
        """The unit vectors of ``texts``; from a greenlet or a thread, never blocking the hub.

        Raises RequestError for no inputs, an empty input or one longer than the model's
        context, Refused when the queue is full or the server shuts down, and
        EmbeddingsUnsupported when this model cannot embed.
        """
        if self._unsupported:
            raise EmbeddingsUnsupported(self._unsupported)
        self._check(texts)
        with self._lock:
            full = len(self._jobs) >= self.queue_size
            if not full:
                job = _Job(list(texts), handoff.EventChannel())
                self._jobs.append(job)
                start = not self._started
                self._started = True
        if full:
            raise Refused(Refusal.QUEUE_FULL, QUEUE_FULL_MESSAGE, RETRY_AFTER)
        if start:
            handoff.start_native_thread(self._run)
        self._wakeup.set()
        try:
            outcome = job.channel.get()
        finally:
            job.cancelled = True  # a client gone while waiting: its job is skipped
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def _check(self, texts: list[str]) -> None:
        if not texts:
            raise RequestError("input", "is empty; send a string or a list of strings")
        if len(texts) > MAX_INPUTS:
            raise RequestError("input", f"has {len(texts)} items; send at most {MAX_INPUTS}")
        context = self.backend.context_length
        for i, text in enumerate(texts):
            if not text:
                raise RequestError(f"input[{i}]", "is an empty string; send some text")
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > context * MAX_BYTES_PER_TOKEN:  # too long before tokenizing (admission.py)
                raise RequestError(f"input[{i}]", f"is {size} bytes, far more than the model's "
                                                  f"context of {context} tokens holds")

    def _cannot(self, reason: str) -> str:
        return f"The model {self.backend.model_name} cannot make embeddings: {reason}."

    # -- the embedding thread -------------------------------------------------------------

    def _run(self) -> None:
        idle_since = time.monotonic()
        while True:
            with self._lock:
                job = self._jobs.popleft() if self._jobs else None
                if job is None and (self._unsupported or time.monotonic() - idle_since >
                                    IDLE_EXIT_SECONDS or self._model is not None
                                    and self._model.closed):
                    self._started = False  # under the lock: the next job starts a thread
                    return
            if job is None:
                self._wakeup.wait(IDLE_POLL_SECONDS)
                continue
            if job.cancelled:
                job.channel.put(None, final=True)  # closes its watcher; nobody reads it
            else:
                job.channel.put(self._answer(job.texts), final=True)
            idle_since = time.monotonic()

    def _answer(self, texts: list[str]) -> Embeddings | Exception:
        try:
            model = self._open()
            tokens = [model.tokenize(text) for text in texts]
            for i, one in enumerate(tokens):
                if not one:
                    return RequestError(f"input[{i}]", "holds no tokens; send some text")
                if len(one) > model.context_length:
                    return RequestError(f"input[{i}]", f"is {len(one)} tokens, more than the "
                                                       f"model's context of "
                                                       f"{model.context_length}; shorten it")
            vectors = model.embed_tokens(tokens)
        except EmbeddingsUnsupported as err:
            return err
        except Exception:  # noqa: BLE001 - answered, never left hanging
            if self._model is not None and self._model.closed:
                return Refused(Refusal.SHUTTING_DOWN, SHUTTING_DOWN, SHUTDOWN_RETRY_AFTER)
            log.exception("making embeddings failed")
            return RuntimeError(EMBEDDING_FAILED)
        return Embeddings([_unit(v) for v in vectors], sum(len(one) for one in tokens),
                          model.dimensions)

    def _open(self) -> EmbeddingModel:
        if self._model is None:
            if self._unsupported:
                raise EmbeddingsUnsupported(self._unsupported)
            try:
                self._model = self.backend.open_embeddings()
            except BackendError as err:
                self._unsupported = self._cannot(str(err))
                log.warning("%s", self._unsupported)
                raise EmbeddingsUnsupported(self._unsupported) from None
        if self._model.closed:
            raise BackendError("the model has been unloaded")
        return self._model


def _unit(vector: np.ndarray) -> np.ndarray:
    vector = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector

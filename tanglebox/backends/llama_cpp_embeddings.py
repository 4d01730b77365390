"""Embeddings on llama.cpp: a second context on the already loaded model, used only by the
embedding thread (``tanglebox.embeddings``), never by the engine's thread.

A llama.cpp model can serve several contexts at once (its weights are read-only); a context
belongs to one thread. So the engine keeps its context for replies, and the first embedding
request opens this one (``LlamaCppBackend.open_embeddings``) with ``embeddings = true``.

Pooling, by what the model is:

- **a causal LM with no pooling of its own** (SmolLM2, Llama, Qwen chat models): the mean of
  the last layer's output (after the final norm) over the input's tokens. llama.cpp's own
  ``LLAMA_POOLING_TYPE_MEAN`` would do that only for a sequence held in one micro-batch, so a
  context that takes an input as long as the model's context (4096 tokens) would reserve a
  compute buffer of 810 MiB plus 805 MiB of logits outputs for SmolLM2 (measured with
  ``n_ubatch = 4096``; 98 MiB and 100 MiB at 512). Instead the context runs unpooled
  (``LLAMA_POOLING_TYPE_NONE``, every token an output) in batches of ``BATCH_TOKENS``: a long
  input is read in pieces over several decodes, its earlier pieces in the KV cache as a reply's
  prompt is, and the mean is taken here over every token's row. The result equals llama.cpp's
  own mean pooling (tests/integration/test_embeddings_real.py compares the two).
- **a model with its own pooling** (an embedding GGUF: BERT-style CLS or mean, Qwen3-Embedding's
  last token): its pooling, whole inputs in one micro-batch (``n_ubatch = n_ctx``, as
  llama.cpp's embedding example and server require), ``llama_get_embeddings_seq`` per input.

Several inputs share a decode, one sequence id each (a unified KV cache, so they share its
cells); a finished input's cells are removed after the decode that finishes it. ``close``
waits for a running decode (a lock), then frees the context; ``LlamaCppBackend.close`` calls it
before it frees the model.
"""

from __future__ import annotations

import logging

import numpy as np

import llama_cpp

from tanglebox import handoff
from tanglebox.backends.base import BackendError

log = logging.getLogger(__name__)

BATCH_TOKENS = 512  # per decode, unpooled: 98 MiB compute + 100 MiB logits for SmolLM2
MAX_SEQUENCES = 64  # inputs per decode (llama.cpp allows 256)


class LlamaCppEmbeddings:
    """Mean-pooled (or the model's own pooling) vectors of token lists; see the module."""

    def __init__(self, model: llama_cpp.llama_model_p, context_length: int, threads: int,
                 pooling_type: int = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED) -> None:
        self._model = model
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        self.context_length = context_length
        self.dimensions = llama_cpp.llama_model_n_embd_out(model)
        self._lock = handoff.native_lock()  # a decode and close exclude each other
        self._ctx = self._new_context(pooling_type, BATCH_TOKENS, threads)
        pooling = llama_cpp.llama_pooling_type(self._ctx)
        if pooling == llama_cpp.LLAMA_POOLING_TYPE_RANK:
            llama_cpp.llama_free(self._ctx)
            raise BackendError("it is a reranking model: it scores pairs of texts instead")
        self.pooled = pooling != llama_cpp.LLAMA_POOLING_TYPE_NONE
        if self.pooled:  # the model's own pooling: whole inputs in one micro-batch
            llama_cpp.llama_free(self._ctx)
            self._ctx = self._new_context(pooling_type, context_length, threads)
        self.batch_tokens = context_length if self.pooled else BATCH_TOKENS
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.batch_tokens, 0, 1)
        self.closed = False

    def _new_context(self, pooling_type: int, batch_tokens: int,
                     threads: int) -> llama_cpp.llama_context_p:
        params = llama_cpp.llama_context_default_params()
        # Unpooled, a long input's cells stay while the next decode's batch_tokens join them;
        # pooled, a decode holds whole inputs and the cells are cleared after each.
        params.n_ctx = self.context_length + (batch_tokens if batch_tokens < self.context_length
                                              else 0)
        params.n_batch = params.n_ubatch = batch_tokens
        params.n_seq_max = MAX_SEQUENCES
        params.kv_unified = True  # inputs of any lengths share the cells
        params.embeddings = True
        params.pooling_type = pooling_type
        params.n_threads = params.n_threads_batch = threads
        ctx = llama_cpp.llama_init_from_model(self._model, params)
        if not ctx:
            raise BackendError(f"llama.cpp could not create an embeddings context of "
                               f"{params.n_ctx} tokens")
        return ctx

    def tokenize(self, text: str) -> list[int]:
        """Tokens as llama.cpp reads an input to embed: BOS (and EOS or SEP, where the model's
        vocabulary asks for them) added, special tokens parsed, as llama-server does."""
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity, True, True)
        if count < 0:  # -count is the size needed
            capacity = -count
            buffer = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity,
                                             True, True)
        return list(buffer[:count])

    def embed_tokens(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """One float32 vector per token list (not normalised), in order. Each list is at most
        ``context_length`` tokens (the caller checks)."""
        with self._lock:
            if self.closed:
                raise BackendError("the embeddings context is closed")
            try:
                if self.pooled:
                    return self._embed_pooled(inputs)
                return self._embed_by_mean(inputs)
            finally:
                llama_cpp.llama_memory_clear(self._memory, True)

    def close(self) -> None:
        with self._lock:
            if not self.closed:
                self.closed = True
                llama_cpp.llama_batch_free(self._batch)
                llama_cpp.llama_free(self._ctx)

    # -- internals ------------------------------------------------------------------------

    def _embed_by_mean(self, inputs: list[list[int]]) -> list[np.ndarray]:
        """Unpooled decodes of up to batch_tokens tokens; inputs in order, the last of a decode
        possibly cut and continued in the next; the mean of each input's rows."""
        sums = [np.zeros(self.dimensions, dtype=np.float64) for _ in inputs]
        index, done = 0, 0  # the input being read, and how many of its tokens are read
        while index < len(inputs):
            pieces: list[tuple[int, int, int]] = []  # (input, start, end)
            room = self.batch_tokens
            while index < len(inputs) and room > 0 and len(pieces) < MAX_SEQUENCES:
                end = min(len(inputs[index]), done + room)
                pieces.append((index, done, end))
                room -= end - done
                if end < len(inputs[index]):
                    done = end
                    break
                index, done = index + 1, 0
            rows = self._decode([(i % MAX_SEQUENCES, inputs[i][start:end], start)
                                 for i, start, end in pieces], outputs=True)
            offset = 0
            for i, start, end in pieces:
                sums[i] += rows[offset:offset + end - start].sum(axis=0, dtype=np.float64)
                offset += end - start
                if end == len(inputs[i]):  # finished: free its cells for the next inputs
                    llama_cpp.llama_memory_seq_rm(self._memory, i % MAX_SEQUENCES, -1, -1)
        return [(total / len(tokens)).astype(np.float32) for total, tokens in zip(sums, inputs)]

    def _embed_pooled(self, inputs: list[list[int]]) -> list[np.ndarray]:
        vectors: list[np.ndarray] = []
        start = 0
        while start < len(inputs):
            end, size = start, 0
            while (end < len(inputs) and end - start < MAX_SEQUENCES
                   and size + len(inputs[end]) <= self.batch_tokens):
                size += len(inputs[end])
                end += 1
            self._decode([(seq, inputs[start + seq], 0) for seq in range(end - start)],
                         outputs=False)
            for seq in range(end - start):
                pointer = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
                vectors.append(np.ctypeslib.as_array(pointer, shape=(self.dimensions,)).copy())
            llama_cpp.llama_memory_clear(self._memory, True)
            start = end
        return vectors

    def _decode(self, items: list[tuple[int, list[int], int]], outputs: bool) -> np.ndarray:
        """One decode of (sequence id, tokens, position of the first); with ``outputs``, every
        token's embedding row, in batch order."""
        batch = self._batch
        n = 0
        for seq, tokens, position in items:
            for offset, token in enumerate(tokens):
                batch.token[n] = token
                batch.pos[n] = position + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = True  # llama.cpp wants every token as an output here
                n += 1
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        if not outputs:
            return np.empty((0, self.dimensions), dtype=np.float32)
        pointer = llama_cpp.llama_get_embeddings(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(n, self.dimensions))

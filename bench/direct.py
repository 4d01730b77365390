"""The yardstick: a plain Python loop over llama-cpp-python's low-level batch API, no server.

One context with a sequence id per stream; every step is one ``llama_decode`` over all the
streams still generating, then ``llama_get_logits_ith`` and a greedy argmax per stream. This is
what the issue measured as "direct": the fastest a Python program can drive llama.cpp here, with
no web side, no queue and no events. Prompts are prefilled together in one batch first.
"""

from __future__ import annotations

import ctypes
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tanglebox.prompting import ModelChatFormat

BATCH_TOKENS = 512  # tokens per decode call; all K prompts must fit in one


@dataclass
class StreamTimes:
    """When one stream's prompt went in and each of its tokens came out (monotonic seconds)."""

    started: float
    token_times: list[float]
    text: str


def cpu_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


def _in_order(nexts: list[tuple[int, int]], order: str, k: int) -> list[tuple[int, int]]:
    if order == "rotated":
        return sorted(nexts, key=lambda item: (item[0] - k // 2) % k)
    if order == "reversed":
        return sorted(nexts, reverse=True)
    return nexts  # ascending ids already


class DirectModel:
    """The model loaded once; ``generate`` runs K prompts batched, greedily, to max_tokens."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        import llama_cpp
        from llama_cpp import _logger
        _logger.set_verbose(False)
        self.llama_cpp = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.threads = threads or cpu_threads()
        self._contexts: dict[int, tuple] = {}  # K -> (context, batch)

    def tokenize(self, text: str) -> list[int]:
        lc = self.llama_cpp
        data = text.encode("utf-8")
        buffer = (lc.llama_token * (len(data) + 8))()
        count = lc.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), True, True)
        return list(buffer[:count])

    def count_tokens(self, text: str) -> int:
        """How many tokens the model's tokenizer makes of a reply's text."""
        lc = self.llama_cpp
        data = text.encode("utf-8")
        buffer = (lc.llama_token * (len(data) + 8))()
        return max(0, lc.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer),
                                        False, False))

    def piece(self, token: int, special: bool = False) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        size = self.llama_cpp.llama_token_to_piece(self.vocab, token, buffer, 64, 0, special)
        return buffer.raw[:max(size, 0)]

    def chat_format(self) -> ModelChatFormat:
        """The model's own chat template, as the llama.cpp backend reads it."""
        lc = self.llama_cpp
        template = lc.llama_model_chat_template(self.model, None)
        special = lambda token: (self.piece(token, special=True).decode("utf-8", "replace")  # noqa: E731
                                 if token >= 0 else "")
        return ModelChatFormat(template.decode("utf-8") if template else None,
                               special(lc.llama_vocab_bos(self.vocab)),
                               special(lc.llama_vocab_eos(self.vocab)))

    def generate(self, prompts: list[list[int]], max_tokens: int,
                 context_per_stream: int = 1024, order: str = "ids") -> list[StreamTimes]:
        """K prompts at once on a warm context for K sequences (made once per K, emptied per
        call), as a server holds its context: no first-call allocation in the timings.

        ``order`` is how each generation step lists the sequences in its batch: ``ids``
        (ascending sequence ids), ``rotated`` (ids K/2…K-1 first, then 0…K/2-1: two runs of
        consecutive ids, as when streams ended and restarted at different times) or
        ``reversed``. With a KV stream per sequence llama.cpp decodes each run of consecutive
        ids separately (``bench/batch_order.py`` measures what that costs)."""
        lc = self.llama_cpp
        k = len(prompts)
        if sum(len(p) for p in prompts) > BATCH_TOKENS:
            raise ValueError(f"the prompts must fit in one batch of {BATCH_TOKENS} tokens")
        if k not in self._contexts:
            params = lc.llama_context_default_params()
            params.n_ctx = context_per_stream * k
            params.n_batch = params.n_ubatch = BATCH_TOKENS
            params.n_seq_max = k
            params.kv_unified = False
            params.n_threads = params.n_threads_batch = self.threads
            ctx = lc.llama_init_from_model(self.model, params)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not create a context for {k} sequences")
            self._contexts[k] = (ctx, lc.llama_batch_init(BATCH_TOKENS, 0, 1))
            self._run(*self._contexts[k], [prompts[0][:8]] * k, 2)  # warm-up
        ctx, batch = self._contexts[k]
        lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
        return self._run(ctx, batch, prompts, max_tokens, order)

    def _run(self, ctx, batch, prompts: list[list[int]], max_tokens: int,
             order: str = "ids") -> list[StreamTimes]:
        lc = self.llama_cpp
        started = time.monotonic()
        streams = [StreamTimes(started, [], "") for _ in prompts]
        texts = [bytearray() for _ in prompts]
        positions = [len(p) for p in prompts]
        n = 0
        rows = []
        for seq, prompt in enumerate(prompts):
            for i, token in enumerate(prompt):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, i, 1
                batch.seq_id[n][0] = seq
                batch.logits[n] = i == len(prompt) - 1
                n += 1
            rows.append(n - 1)
        batch.n_tokens = n
        if lc.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed during the prompts")
        live = list(range(len(prompts)))
        while live:
            now = time.monotonic()
            nexts = []
            for seq, row in zip(live, rows):
                logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, row),
                                               shape=(self.n_vocab,))
                token = int(np.argmax(logits))
                if lc.llama_vocab_is_eog(self.vocab, token):
                    continue
                streams[seq].token_times.append(now)
                texts[seq] += self.piece(token)
                if len(streams[seq].token_times) < max_tokens:
                    nexts.append((seq, token))
            if not nexts:
                break
            nexts = _in_order(nexts, order, len(prompts))
            for i, (seq, token) in enumerate(nexts):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, positions[seq], 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = True
                positions[seq] += 1
            batch.n_tokens = len(nexts)
            if lc.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed while generating")
            live = [seq for seq, _ in nexts]
            rows = list(range(len(nexts)))
        for stream, text in zip(streams, texts):
            stream.text = text.decode("utf-8", errors="replace")
        return streams

    def close(self) -> None:
        for ctx, batch in self._contexts.values():
            self.llama_cpp.llama_batch_free(batch)
            self.llama_cpp.llama_free(ctx)
        self._contexts.clear()
        self.llama_cpp.llama_model_free(self.model)

"""llama.cpp through llama-cpp-python's low-level API: one context, one sequence per slot.

Every engine step is one ``llama_decode`` over a batch that holds all active slots: one token
for each generating slot plus prompt chunks for slots still reading their prompt, each token
tagged with its slot's sequence id. Logits are requested only for the last token of an item
that needs them (its last ``logits_count``, when the engine checks a lookup draft), and handed to the engine as views of llama.cpp's own buffer (valid until the
next decode, by which time the engine has sampled from them). ``forget`` removes a slot's
cached positions (``llama_memory_seq_rm``), which is how a conversation's next turn reuses its
cached prefix.

The context holds ``contextLength`` tokens per slot (``n_ctx = contextLength * slots``, with a
separate KV stream per sequence). ctypes releases the GIL during ``llama_decode``, so the web
greenlets keep running while the model computes.

``grammar`` makes a reply's constraint to a GBNF grammar (``llama_grammar.LlamaGrammar``).

With a KV cache folder (``kvCacheDirectory``, ``kvCacheDiskMegabytes``), a slot's cache outlives
the slot: the backend follows which tokens each slot holds (from the decodes and forgets), saves
a slot's sequence state (``llama_state_seq_get_data``) into the folder when ``forget`` is about
to drop a long run of it and at ``close``, and ``restore_prefix`` loads the saved state that
starts a new prompt (``llama_state_seq_set_data``) when it holds more of it than the slot. The
folder itself: ``tanglebox.backends.llama_cpp_saved_state``.
"""

from __future__ import annotations

import ctypes
import logging
import os
from hashlib import sha256
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import llama_cpp
from llama_cpp import _logger as llama_logger

from tanglebox import handoff
from tanglebox.backends.base import BackendError, DecodeItem
from tanglebox.backends.llama_cpp_saved_state import SavedStates
from tanglebox.backends.llama_grammar import LlamaGrammar
from tanglebox.model_location import ModelLocation
from tanglebox.prompting import ModelChatFormat
from tanglebox.settings import Settings

if TYPE_CHECKING:
    from tanglebox.backends.llama_cpp_embeddings import LlamaCppEmbeddings

log = logging.getLogger(__name__)

BATCH_TOKENS = 512  # tokens per decode call: prompt chunks are cut to fit beside the streams
# Prompt tokens per step while other replies stream. On a CPU every token of a batch costs
# about the same (matrix products are compute-bound), so a 512-token chunk would stall every
# stream for the time of 512 tokens; 64 keeps a stream's pause under ~10x a normal step.
CPU_PREFILL_CHUNK = 64
# The KV cache precisions llama.cpp's CPU (and CUDA) flash-attention kernels support for both
# K and V (the setting ``kvCacheType``).
KV_CACHE_TYPES = {"f16": llama_cpp.GGML_TYPE_F16, "q8_0": llama_cpp.GGML_TYPE_Q8_0,
                  "q4_0": llama_cpp.GGML_TYPE_Q4_0}
# Sequences shorter than this are not saved: reading 256 tokens takes about a second on 2 CPU
# cores, loading their state from disk a few milliseconds, but a folder of short states would
# mostly hold greetings no one continues.
MIN_SAVED_TOKENS = 256
# Dropping fewer tokens than this is a conversation's own next turn (its reply re-rendered by
# the template), not the slot going to another: nothing is saved, nothing loaded for so little.
SAVED_STATE_SLACK = 32
FINGERPRINT_SAMPLE = 1 << 20  # bytes of the model file's head and tail that name the model


def gpu_offload_supported() -> bool:
    return bool(llama_cpp.llama_supports_gpu_offload())


def cpu_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
               else os.cpu_count() or 1)


class LlamaCppBackend:
    name = "llama.cpp"
    supports_grammar = True
    verifies_drafts = True  # DecodeItem.logits_count above 1: logits at each drafted position

    def __init__(self, path: Path, context_length: int, slots: int, gpu_layers: int,
                 device: str, verbose: bool = False, kv_cache_type: str = "f16",
                 kv_cache: Path | None = None, kv_cache_bytes: int = 0) -> None:
        llama_logger.set_verbose(verbose)
        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = gpu_layers
        self._model = llama_cpp.llama_model_load_from_file(str(path).encode(), model_params)
        if not self._model:
            raise BackendError(f"llama.cpp could not load {path}; is it a valid GGUF file?")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        trained = llama_cpp.llama_model_n_ctx_train(self._model)
        self.context_length = min(context_length, trained) if trained > 0 else context_length
        if self.context_length < context_length:
            log.warning("contextLength %d is above what %s was trained for; using %d",
                        context_length, path.name, self.context_length)
        self.max_sequences = slots
        self.batch_tokens = BATCH_TOKENS
        self.prefill_chunk = BATCH_TOKENS if gpu_layers > 0 else CPU_PREFILL_CHUNK
        threads = cpu_threads()
        ctx_params = llama_cpp.llama_context_default_params()
        ctx_params.n_ctx = self.context_length * slots
        ctx_params.n_batch = BATCH_TOKENS
        ctx_params.n_ubatch = BATCH_TOKENS
        ctx_params.n_seq_max = slots
        ctx_params.kv_unified = False  # a KV stream per sequence: no cross-slot attention work
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        self.kv_cache_type = kv_cache_type
        ctx_params.type_k = ctx_params.type_v = KV_CACHE_TYPES[kv_cache_type]
        if kv_cache_type != "f16":  # llama.cpp keeps a quantized V cache only with it
            ctx_params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self._ctx = llama_cpp.llama_init_from_model(self._model, ctx_params)
        if not self._ctx:
            llama_cpp.llama_model_free(self._model)
            raise BackendError(f"llama.cpp could not create a context of {ctx_params.n_ctx} "
                               f"tokens with a {kv_cache_type} KV cache; lower "
                               "\"contextLength\" or \"parallelSlots\", or use "
                               "\"kvCacheType\": \"f16\"")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._piece_cache: dict[int, bytes] = {}
        # Answered from Python after a token's first time: a ctypes call releases the GIL,
        # and the engine asks for every token between two decodes (see Engine._step).
        self._end_of_turn_cache: dict[int, bool] = {}
        self.model_name = path.name
        self.device = device
        self.chat_format = ModelChatFormat(
            chat_template=self._chat_template(),
            bos_token=self._special_text(llama_cpp.llama_vocab_bos(self._vocab)),
            eos_token=self._special_text(llama_cpp.llama_vocab_eos(self._vocab)))
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self._vocab))
        self._bos = llama_cpp.llama_vocab_bos(self._vocab)
        self.saved_states: SavedStates | None = None
        # The tokens each slot's KV cache holds; None after a failed decode (then unknown, so
        # never saved, until the slot is emptied).
        self._held: list[list[int] | None] = [[] for _ in range(slots)]
        if kv_cache is not None and kv_cache_bytes > 0:
            try:
                self.saved_states = SavedStates(kv_cache, _fingerprint(path, ctx_params),
                                                kv_cache_bytes)
            except OSError as err:  # a cache: serving goes on without it
                log.warning("KV caches will not be saved: %s (kvCacheDirectory)", err)

    @classmethod
    def load(cls, settings: Settings, location: ModelLocation) -> "LlamaCppBackend":
        device = settings["device"]
        on_gpu = device in ("cuda", "mps") and gpu_offload_supported()
        layers = settings["nGpuLayers"] if on_gpu else 0
        return cls(location.path, settings["contextLength"], settings["parallelSlots"],
                   gpu_layers=999 if layers < 0 else layers,
                   device=device if on_gpu else "cpu",
                   verbose=settings["enableModelDebugOutput"],
                   kv_cache_type=settings["kvCacheType"],
                   kv_cache=settings.relative_path(settings["kvCacheDirectory"]),
                   kv_cache_bytes=settings["kvCacheDiskMegabytes"] << 20)

    # -- tokens ---------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buffer = (llama_cpp.llama_token * capacity)()
        count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity,
                                         False, True)
        if count < 0:  # the buffer was too small: -count is the size needed
            capacity = -count
            buffer = (llama_cpp.llama_token * capacity)()
            count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, capacity,
                                             False, True)
        tokens = list(buffer[:count])
        if self._add_bos and (not tokens or tokens[0] != self._bos):
            tokens.insert(0, self._bos)
        return tokens

    def token_bytes(self, token: int) -> bytes:
        piece = self._piece_cache.get(token)
        if piece is None:
            piece = self._piece(token, special=False)
            self._piece_cache[token] = piece
        return piece

    def is_end_of_turn(self, token: int) -> bool:
        answer = self._end_of_turn_cache.get(token)
        if answer is None:
            answer = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
            self._end_of_turn_cache[token] = answer
        return answer

    # -- the model ------------------------------------------------------------------------

    def decode(self, items: list[DecodeItem]) -> list[np.ndarray | None]:
        total = sum(len(item.tokens) for item in items)
        if total > BATCH_TOKENS:  # before writing: the batch's arrays hold BATCH_TOKENS
            raise ValueError(f"a decode of {total} tokens is over the batch size {BATCH_TOKENS}")
        # In slot (sequence id) order: with a KV stream per sequence, llama.cpp makes one pass
        # over the model per run of consecutive ids in the batch, and the engine lists its
        # streams in admission order (python -m bench.batch_order: reversed 0.76).
        in_order = sorted(range(len(items)), key=lambda i: items[i].slot)
        batch = self._batch
        n = 0
        for item in (items[i] for i in in_order):
            first_out = len(item.tokens) - (item.logits_count if item.want_logits else 0)
            for offset, token in enumerate(item.tokens):
                batch.token[n] = token
                batch.pos[n] = item.position + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = item.slot
                batch.logits[n] = offset >= first_out
                n += 1
        batch.n_tokens = n
        status = llama_cpp.llama_decode(self._ctx, batch)
        if status != 0:
            for item in items:
                self._held[item.slot] = None
            raise RuntimeError(f"llama_decode failed with status {status}")
        if self.saved_states is not None:
            for item in items:
                held = self._held[item.slot]
                if held is not None:
                    del held[item.position:]
                    held.extend(item.tokens)
        rows = self._logits_rows(sum(item.logits_count for item in items if item.want_logits))
        results: list[np.ndarray | None] = [None] * len(items)
        row = 0
        for i in in_order:  # logits rows come in batch order
            if items[i].want_logits:
                count = items[i].logits_count
                results[i] = rows[row] if count == 1 else rows[row:row + count]
                row += count
        return results

    def forget(self, slot: int, keep: int) -> None:
        if self.saved_states is not None:
            self._save_before_drop(slot, keep)
        llama_cpp.llama_memory_seq_rm(self._memory, slot, keep, -1)
        held = self._held[slot]
        if keep == 0:
            self._held[slot] = []
        elif held is not None:
            del held[keep:]

    def grammar(self, gbnf: str) -> LlamaGrammar:
        return LlamaGrammar(self._vocab, self._n_vocab, gbnf)

    def close(self) -> None:
        self._close_embeddings()  # a context on the model: freed before the model
        if self._ctx:
            if self.saved_states is not None:  # every slot's cache, for the next start
                for slot in range(self.max_sequences):
                    self._save_before_drop(slot, keep=0)
            llama_cpp.llama_batch_free(self._batch)
            llama_cpp.llama_free(self._ctx)
            llama_cpp.llama_model_free(self._model)
            self._ctx = None

    # -- the KV cache on disk ---------------------------------------------------------------

    def restore_prefix(self, slot: int, tokens: list[int], cached: int) -> list[int] | None:
        """Load into ``slot`` the saved state sharing the longest prefix with ``tokens`` when it
        holds more of them than the slot's ``cached``; then the tokens the slot holds (all of
        the saved sequence: the caller forgets what it does not share), else None: the slot is
        as it was. The engine calls this as it gives ``slot`` to a request."""
        if self.saved_states is None or len(tokens) < MIN_SAVED_TOKENS:
            return None
        found = self.saved_states.longest_prefix(tokens)
        if found is None or found[1] < MIN_SAVED_TOKENS or found[1] <= cached + SAVED_STATE_SLACK:
            return None
        state = found[0]
        data = self.saved_states.read(state)
        if data is None:
            return None
        self.forget(slot, 0)  # saving what it held first, when worth it
        buffer = (ctypes.c_uint8 * len(data)).from_buffer(data)
        if not llama_cpp.llama_state_seq_set_data(self._ctx, buffer, len(data), slot):
            self.saved_states.discard(state, "llama.cpp could not load it")
            llama_cpp.llama_memory_seq_rm(self._memory, slot, 0, -1)
            return []
        self._held[slot] = state.tokens.tolist()
        return list(self._held[slot])

    def _save_before_drop(self, slot: int, keep: int) -> None:
        """Save the slot's sequence when ``forget(slot, keep)`` would drop a long run of it.
        On the engine's thread, which owns the context: llama.cpp copies the state in memory
        in a few milliseconds; with the file written, about 5 ms per MB on 2 busy CPU cores
        (docs/benchmarks.md: a conversation's next turn after a restart)."""
        held = self._held[slot]
        if (self.saved_states is None or held is None or len(held) < MIN_SAVED_TOKENS
                or len(held) - keep <= SAVED_STATE_SLACK or self.saved_states.holds(held)):
            return
        try:
            size = llama_cpp.llama_state_seq_get_size(self._ctx, slot)
            buffer = (ctypes.c_uint8 * size)()
            if llama_cpp.llama_state_seq_get_data(self._ctx, buffer, size, slot) != size:
                log.warning("llama.cpp did not copy slot %d's state; not saved", slot)
                return
            self.saved_states.write(held, memoryview(buffer))
        except Exception:  # noqa: BLE001 - a cache: a failed save must not fail a request
            log.exception("saving slot %d's KV state failed", slot)

    # -- helpers --------------------------------------------------------------------------

    def _logits_rows(self, count: int) -> np.ndarray:
        """The logits of this step's outputs, one row each in batch order (llama.h's contract
        for ``llama_get_logits``), as a view of llama.cpp's buffer: no copy. The engine samples
        from them before the next decode, which is when llama.cpp overwrites them."""
        if count == 0:
            return np.empty((0, self._n_vocab), dtype=np.float32)
        pointer = llama_cpp.llama_get_logits(self._ctx)
        return np.ctypeslib.as_array(pointer, shape=(count, self._n_vocab))

    def _piece(self, token: int, special: bool) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, 64, 0, special)
        if size < 0:
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, -size, 0, special)
        return buffer.raw[:size]

    def _special_text(self, token: int) -> str:
        return self._piece(token, special=True).decode("utf-8", errors="replace") if token >= 0 else ""

    def _chat_template(self) -> str | None:
        template = llama_cpp.llama_model_chat_template(self._model, None)
        return template.decode("utf-8") if template else None

    # -- embeddings (tanglebox.embeddings; the context: tanglebox.backends.llama_cpp_embeddings)

    _embeddings = None  # the embeddings context, once opened
    _embeddings_closed = False
    _embeddings_guard = handoff.native_lock()  # opening (embedding thread) vs close (engine's)

    def open_embeddings(self) -> "LlamaCppEmbeddings":
        """A second context on this model for embeddings, made at the first call (on the
        embedding thread); BackendError with the reason where it cannot be made."""
        from tanglebox.backends.llama_cpp_embeddings import LlamaCppEmbeddings
        with self._embeddings_guard:
            if self._embeddings_closed:
                raise BackendError("the model has been unloaded")
            if self._embeddings is None:
                self._embeddings = LlamaCppEmbeddings(self._model, self.context_length,
                                                      cpu_threads())
            return self._embeddings

    def _close_embeddings(self) -> None:
        with self._embeddings_guard:
            self._embeddings_closed = True
            if self._embeddings is not None:
                self._embeddings.close()  # waits for a running decode


def _fingerprint(path: Path, ctx_params: llama_cpp.llama_context_params) -> bytes:
    """What a saved state is only good for: this model file (its size, head and tail; hashing
    gigabytes at every start would be too slow), this llama.cpp, this context shape."""
    digest = sha256(f"{llama_cpp.__version__}|{ctx_params.n_ctx // ctx_params.n_seq_max}|"
                    f"{ctx_params.type_k}|{ctx_params.type_v}|".encode())
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        digest.update(str(size).encode())
        digest.update(file.read(FINGERPRINT_SAMPLE))
        file.seek(max(0, size - FINGERPRINT_SAMPLE))
        digest.update(file.read(FINGERPRINT_SAMPLE))
    return digest.digest()

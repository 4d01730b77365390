"""One reply constrained to a GBNF grammar: llama.cpp's grammar sampler, driven token by token.

The engine's sampler (``tanglebox.sampling``) picks a token from the unconstrained logits and
asks ``allows`` about that one token: a one-element ``llama_token_data`` array through
``llama_sampler_apply``, which sets its logit to -inf when the grammar refuses it. Most picks
pass. Only a refused pick costs a pass over the whole vocabulary: ``restrict`` lays the logits
out as ``llama_token_data`` in a numpy structured array (no Python loop over the tokens) and
hands llama.cpp a pointer to it; the sampler picks again from what is left. This is llama.cpp's
own rejection scheme (``common_sampler_sample`` in common/sampling.cpp).

The grammar allows an end-of-turn token only where it is complete (llama.cpp's sampler does
that). ``accept`` must only ever get an allowed token: llama.cpp aborts the process on one it
refuses (``llama_grammar_accept_impl``), so the sampler accepts nothing it has not checked.
The native sampler is freed by ``close`` when the reply ends; everything here runs on the
engine's thread.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np

import llama_cpp

from tanglebox.backends.base import GrammarError

# llama_token_data {int32 id; float logit; float p}, as numpy lays out a record of it.
TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])
assert TOKEN_DATA.itemsize == ctypes.sizeof(llama_cpp.llama_token_data)


class LlamaGrammar:
    """A :class:`tanglebox.backends.base.TokenConstraint` over one llama.cpp grammar sampler."""

    def __init__(self, vocab: llama_cpp.llama_vocab_p, n_vocab: int, gbnf: str) -> None:
        try:
            text = gbnf.encode("utf-8")
        except UnicodeEncodeError:
            raise GrammarError("The grammar is not valid UTF-8 text.") from None
        if not text.strip() or b"\0" in text:
            raise GrammarError("The grammar is empty or holds a NUL character.")
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, text, b"root")
        if not self._sampler:
            raise GrammarError("The grammar could not be used: llama.cpp's GBNF parser refused "
                               "it (a syntax error, an undefined rule, left recursion, or no "
                               "'root' rule).")
        self._n_vocab = n_vocab
        self._one = llama_cpp.llama_token_data()
        self._one_array = llama_cpp.llama_token_data_array(ctypes.pointer(self._one), 1, -1,
                                                           False)
        self._all: np.ndarray | None = None  # the whole vocabulary, made at the first refusal
        self._all_array: llama_cpp.llama_token_data_array | None = None

    def allows(self, token: int) -> bool:
        self._one.id, self._one.logit, self._one.p = token, 0.0, 0.0
        self._one_array.size, self._one_array.selected = 1, -1
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._one_array))
        return self._one.logit != -math.inf

    def restrict(self, logits: np.ndarray) -> np.ndarray:
        if self._all is None:
            self._all = np.zeros(self._n_vocab, dtype=TOKEN_DATA)
            self._all["id"] = np.arange(self._n_vocab, dtype=np.int32)
            pointer = self._all.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data))
            self._all_array = llama_cpp.llama_token_data_array(pointer, self._n_vocab, -1, False)
        self._all["logit"] = logits[:self._n_vocab]
        self._all_array.size, self._all_array.selected = self._n_vocab, -1
        self._all_array.sorted = False
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._all_array))
        return self._all["logit"].copy()

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self._sampler, token)

    def close(self) -> None:
        if self._sampler:
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None

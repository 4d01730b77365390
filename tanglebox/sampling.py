"""Choose each next token of one reply from the model's logits: done once here for every backend.

The engine keeps one :class:`Sampler` per reply, built from its request (temperature and
``SamplingOptions``). For every token::

    raw logits ─► + logit_bias, − penalties (a copy, only when the reply has either)
               ─► pick: temperature 0 is greedy (argmax); above 0 top-k, then top-p (nucleus),
                  then a draw at the temperature, as llama.cpp's default sampler chain does
               ─► grammar (when the request has one): is the picked token allowed? Only when
                  it is not, the grammar masks the whole vocabulary and the pick runs again
                  (llama.cpp's common sampler does the same: checking one token is cheap,
                  masking 49k is not); the chosen token is accepted into the grammar

Penalties follow OpenAI's rule over the tokens of this reply so far: ``logit[j] -= count[j] *
frequency_penalty + (count[j] > 0) * presence_penalty``. A request's ``seed`` makes its draws
reproducible; without one the engine passes its own (the ``seed`` setting), else the draws are
random. Log probabilities (``top_logprobs``) are the log-softmax of the raw logits, before
bias, penalties and temperature (what vLLM reports); the sampler keeps them for the reply's
tokens (an end-of-turn token is not one) until the engine sends them with a Delta.

With no options the path per token is what it always was (one argmax, or one top-k draw): the
engine samples every token of every stream, and the serving benchmark holds it level with
llama-server.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from tanglebox.backends.base import Backend, GrammarError, TokenConstraint
from tanglebox.chat_request import ChatRequest, SamplingOptions
from tanglebox.generation import TokenLogprob, TopLogprob

SEED_BITS = (1 << 64) - 1  # any integer seed works: negative or huge ones are cut to 64 bits


class Sampler:
    """Chooses the tokens of one reply; used from the engine's thread only."""

    def __init__(self, temperature: float, options: SamplingOptions = SamplingOptions(),
                 seed: int | None = None, token_bytes: Callable[[int], bytes] = lambda t: b"",
                 is_end_of_turn: Callable[[int], bool] = lambda t: False,
                 constraint: TokenConstraint | None = None) -> None:
        self.temperature = temperature
        self.top_k = options.top_k
        self.top_p = options.top_p
        if options.seed is not None:
            seed = options.seed
        self._rng = np.random.default_rng(None if seed is None else seed & SEED_BITS)
        self._frequency = options.frequency_penalty
        self._presence = options.presence_penalty
        self._counts: dict[int, int] | None = (
            {} if self._frequency or self._presence else None)
        bias = dict(options.logit_bias)  # one value per token: the last one given
        self._bias_ids = np.fromiter(bias, dtype=np.int64, count=len(bias))
        self._bias_values = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))
        self._bias_vocab = -1  # the vocabulary size the bias ids were last checked against
        self._top_logprobs = options.top_logprobs
        self._token_bytes = token_bytes
        self._is_end_of_turn = is_end_of_turn
        self.logprobs: list[TokenLogprob] = []  # the reply's tokens', when the request asks
        self._logprobs_sent = 0
        self.constraint = constraint

    @classmethod
    def for_request(cls, request: ChatRequest, backend: Backend, seed: int | None) -> Sampler:
        """The sampler of ``request``'s reply (``seed`` unless the request has its own);
        raises GrammarError for a grammar the backend cannot use."""
        grammar = request.sampling.grammar
        if grammar is not None and not getattr(backend, "supports_grammar", False):
            raise GrammarError(f"The {backend.name} backend cannot constrain a reply to a "
                               "grammar (response_format); the llama.cpp backend can.")
        constraint = backend.grammar(grammar) if grammar is not None else None
        return cls(request.temperature, request.sampling, seed, backend.token_bytes,
                   backend.is_end_of_turn, constraint)

    @property
    def verifies_drafts(self) -> bool:
        """Whether ``choose`` may be given a draft (``tanglebox.lookup_decoding``): not with a
        grammar (it follows one token at a time) nor with log probabilities."""
        return self.constraint is None and self._top_logprobs is None

    def choose(self, logits: np.ndarray, draft: int | None = None) -> int:
        """The next token (``logits`` is left as it was: log probabilities are read from it).

        ``draft``: a token proposed for this position (lookup decoding); the token returned
        has the same distribution as without it, and is the draft as often as it can be.
        """
        scores = self._adjusted(logits)
        token = self._pick(scores, draft)
        if self.constraint is not None:
            if not self.constraint.allows(token):
                scores = self.constraint.restrict(scores)
                if not np.isfinite(scores.max()):
                    raise GrammarError("The grammar allows no token here; the reply cannot go on.")
                token = self._pick(scores)
            self.constraint.accept(token)
        if self._counts is not None:
            self._counts[token] = self._counts.get(token, 0) + 1
        if self._top_logprobs is not None and not self._is_end_of_turn(token):
            self.logprobs.append(
                token_logprob(logits, token, self._top_logprobs, self._token_bytes))
        return token

    def unsent_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The log probabilities of the tokens chosen since the last call."""
        if not self.logprobs:
            return ()
        unsent = tuple(self.logprobs[self._logprobs_sent:])
        self._logprobs_sent = len(self.logprobs)
        return unsent

    def close(self) -> None:
        """Free the grammar (native memory); any number of calls are safe."""
        if self.constraint is not None:
            self.constraint.close()

    def _adjusted(self, logits: np.ndarray) -> np.ndarray:
        """The logits with the bias added and the penalties taken off: a copy, only if any."""
        penalized = bool(self._counts)
        if not penalized and not self._bias_ids.size:
            return logits
        scores = logits.copy()
        if self._bias_ids.size:
            if self._bias_vocab != scores.shape[-1]:
                # Ids outside the vocabulary are the adapter's 400; here they are only ignored.
                self._bias_vocab = scores.shape[-1]
                inside = (self._bias_ids >= 0) & (self._bias_ids < self._bias_vocab)
                self._bias_ids, self._bias_values = (self._bias_ids[inside],
                                                     self._bias_values[inside])
            scores[self._bias_ids] += self._bias_values
        if penalized:
            ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            counts = np.fromiter(self._counts.values(), dtype=np.float32, count=len(ids))
            scores[ids] -= counts * self._frequency + self._presence
        return scores

    def _pick(self, scores: np.ndarray, draft: int | None = None) -> int:
        if self.temperature <= 0:  # greedy: the draft is right exactly when it is the argmax
            return int(np.argmax(scores))
        k = scores.shape[-1] if self.top_k <= 0 else min(self.top_k, scores.shape[-1])
        candidates = np.argpartition(scores, -k)[-k:]
        values = scores[candidates].astype(np.float64) / self.temperature
        order = np.argsort(-values)
        candidates, values = candidates[order], values[order]
        probs = np.exp(values - values[0])
        probs /= probs.sum()
        keep = min(int(np.searchsorted(np.cumsum(probs), self.top_p)) + 1, k)
        probs = probs[:keep] / probs[:keep].sum()
        if draft is not None:
            # The acceptance rule for a deterministic proposal: keep the draft with probability
            # p(draft), else draw from p without it (tanglebox.lookup_decoding: exact).
            at = np.flatnonzero(candidates[:keep] == draft)
            if at.size:
                if self._rng.random() < probs[at[0]]:
                    return draft
                probs = probs.copy()
                probs[at[0]] = 0.0
                probs /= probs.sum()
        return int(candidates[self._rng.choice(keep, p=probs)])


def token_logprob(logits: np.ndarray, token: int, top: int,
                  token_bytes: Callable[[int], bytes]) -> TokenLogprob:
    """``token``'s log-softmax under ``logits``, and the ``top`` most likely tokens, best first."""
    scores = logits.astype(np.float64)
    highest = scores.max()
    log_total = highest + np.log(np.exp(scores - highest).sum())
    top = min(top, scores.shape[-1])
    best = np.argpartition(-scores, top - 1)[:top] if top > 0 else np.empty(0, dtype=np.int64)
    best = best[np.argsort(-scores[best], kind="stable")]
    data = token_bytes(token)
    return TokenLogprob(
        data.decode("utf-8", errors="replace"), data, float(scores[token] - log_total),
        tuple(TopLogprob(token_bytes(int(t)).decode("utf-8", errors="replace"),
                         token_bytes(int(t)), float(scores[t] - log_total)) for t in best))

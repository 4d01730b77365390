"""Prompt-lookup (n-gram) speculative decoding: a reply's next tokens guessed from its own
context, checked by the model in the engine's one batched decode per step.

Replies that repeat what they were given (edit this code, fix this text, quote it) can get
several tokens from one decode. Flow, per generating slot and step (``Engine._step``)::

    draft:   the last n tokens (n = 3, 2: longest first) looked up in an index of every
             earlier n-gram of the slot's prompt + reply; the up to ``DRAFT_TOKENS`` tokens
             that followed its most recent occurrence are the draft (cut before an end of turn,
             and to what the reply's token limit and the context leave)
    decode:  the slot's item is its last token + the draft, with logits at every position
             (``DecodeItem.logits_count``), in the same batch as every other slot
    verify:  at each position the sampler picks a token with the draft's token as a proposal
             (``Sampler.choose(row, draft=…)``), up to the first pick that differs from the
             draft (the model's own token there), or one past the draft when all match
    accept:  the engine keeps the matched draft tokens in the slot's KV cache, forgets the
             rest, and takes the picked tokens one by one through its usual path, so a stop
             string or a cancel ends the run where it ends a reply
    back off: a slot whose drafts keep failing stops drafting for a while (longer each time),
             and a step of more than ``DRAFTING_STREAMS`` replies takes none (a CPU pays for
             every token of a batch: beside other replies drafts slow every one)

Exact at every temperature: greedy, the pick at each position is the argmax of the very logits
plain decoding would see there (the drafted tokens before it are the ones plain decoding would
have chosen), so the reply is the same token for token. Sampling, a draft token x is a
deterministic proposal, and the standard acceptance rule for it (accept x with probability p(x)
under the sampler's adjusted distribution, else draw from p with x removed, renormalised) gives
each token exactly p: p(x) + 0 for x, (1 - p(x)) p(y) / (1 - p(x)) for any other y.

No drafts where the reply has a grammar (the constraint follows one token at a time) or asks
for log probabilities, and on a backend without ``verifies_drafts`` (transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from tanglebox.backends.base import Backend
from tanglebox.sampling import Sampler

DRAFT_TOKENS = 8  # the longest draft: more costs a longer decode for a rarer full match
FIRST_DRAFT = 2  # a slot's first draft length; then one past what the last draft got right,
# or twice as long when all of it was (each drafted token costs compute, wrong or right)
LONGEST_NGRAM = 3  # the longest suffix looked up, then shorter ones down to SHORTEST_NGRAM
# A one-token match guesses badly in ordinary chat, and on a CPU a decode costs about linearly
# in its tokens (1, 2, 3, 5, 9 tokens: 11.5, 20, 28, 37, 57 ms on 2 cores), so a wrong guess
# costs most of a step.
SHORTEST_NGRAM = 2
# The most replies (generating or reading their prompt) a step may hold and still take drafts.
# On a CPU every token of a batch costs about the same (CPU_PREFILL_CHUNK), so beside other
# replies a draft's tokens cost what theirs do (python -m bench.lookup, 2 cores, 8 streams:
# drafting freely, chat ran at 0.53 of plain decoding; with drafts only while at most 2 replies
# generated, the edit workload at 0.73-0.92; with drafts only for a reply alone, 1.05).
DRAFTING_STREAMS = 1
MISSES_BEFORE_PAUSE = 1  # drafts in a row with less than half accepted before a slot pauses
FIRST_PAUSE = 16  # steps without drafts after the first run of misses; doubles at each next
LONGEST_PAUSE = 256


@dataclass
class LookupState:
    """One reply's n-gram index and back-off (belongs to the engine's thread)."""

    # n-gram → where its most recent occurrence's continuation starts
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    indexed: int = 0  # positions of the sequence whose n-grams ending there are in ``index``
    misses: int = 0  # drafts in a row that had less than half of their tokens accepted
    paused: int = 0  # steps left without drafts
    pause: int = FIRST_PAUSE  # the next pause's length
    length: int = FIRST_DRAFT  # the next draft's length at most


class LookupDecoding:
    """The engine's lookup decoding: whether it drafts, and what its drafts have done."""

    def __init__(self, backend: Backend, enabled: bool = True,
                 draft_tokens: int = DRAFT_TOKENS) -> None:
        self.enabled = enabled and getattr(backend, "verifies_drafts", False)
        self.draft_tokens = draft_tokens
        self._context_length = backend.context_length
        self._is_end_of_turn = backend.is_end_of_turn
        self.drafted = 0  # draft tokens sent to the model, ever
        self.accepted = 0  # of which the model agreed with

    def room(self, replies: int) -> int:
        """Draft tokens a step of ``replies`` active slots may hold, all drafts together."""
        return self.draft_tokens * replies if self.enabled and replies <= DRAFTING_STREAMS else 0

    def draft(self, state: LookupState, sampler: Sampler, cached: list[int], last: int,
              limit: int) -> list[int]:
        """Up to ``limit`` tokens guessed to follow the slot's ``cached`` tokens and ``last``
        (the token about to be decoded); none while the slot backs off.

        The draft leaves room for one more token in the context, so that the reply's token
        limit (``limit``: the tokens it may still have, less one) and the context end a run
        only at its last token, where they end a step."""
        limit = min(limit, state.length, self.draft_tokens,
                    self._context_length - len(cached) - 3)
        if not self.enabled or limit <= 0 or not sampler.verifies_drafts:
            return []
        if state.paused:
            state.paused -= 1
            return []
        tokens = cached + [last]
        start = _most_recent_continuation(state, tokens)
        if start is None:
            return []
        draft = []
        for token in tokens[start:start + limit]:
            if self._is_end_of_turn(token):  # the reply's end is never drafted: it ends a run
                break
            draft.append(token)
        return draft

    def verify(self, state: LookupState, sampler: Sampler, draft: list[int],
               rows: np.ndarray) -> list[int]:
        """The tokens the model gives after checking ``draft``: the matching draft tokens,
        then its own token (``rows``: the logits after the last token and each draft token)."""
        chosen: list[int] = []
        for i, row in enumerate(rows):
            proposal = draft[i] if i < len(draft) else None
            token = sampler.choose(row, draft=proposal)
            chosen.append(token)
            if token != proposal:  # always so past the draft, where there is no proposal
                break
        self._record(state, len(draft), len(chosen) - 1)
        return chosen

    def _record(self, state: LookupState, drafted: int, accepted: int) -> None:
        self.drafted += drafted
        self.accepted += accepted
        state.length = accepted * 2 if accepted == drafted else accepted + 1
        if accepted * 2 >= drafted:
            state.misses, state.pause = 0, FIRST_PAUSE
            return
        state.misses += 1
        if state.misses >= MISSES_BEFORE_PAUSE:
            state.misses, state.paused = 0, state.pause
            state.pause = min(state.pause * 2, LONGEST_PAUSE)


def _most_recent_continuation(state: LookupState, tokens: Sequence[int]) -> int | None:
    """Where the continuation of the most recent earlier occurrence of ``tokens``' last n
    tokens starts, for the longest n that has one; the index is brought up to date first."""
    for end in range(state.indexed, len(tokens)):  # n-grams ending before position ``end``
        for n in range(1, min(LONGEST_NGRAM, end) + 1):
            state.index[tuple(tokens[end - n:end])] = end
    state.indexed = len(tokens)
    for n in range(min(LONGEST_NGRAM, len(tokens) - 1), SHORTEST_NGRAM - 1, -1):
        start = state.index.get(tuple(tokens[len(tokens) - n:]))
        if start is not None:
            return start
    return None

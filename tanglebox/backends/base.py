"""What every backend provides to the engine, and nothing more.

A backend loads a model and turns token sequences into next-token logits. It knows nothing of
HTTP, sockets, templates, sampling or stop strings (the engine does those once for all).

Sequences live in numbered slots (0 .. ``max_sequences``-1), each with its own KV cache.
``decode`` appends tokens to several slots at once (one batched forward pass) and returns the
logits after the last token of each item that asks for them (after each of its last
``logits_count`` tokens, a row per token, from a backend with ``verifies_drafts``: the engine
checks lookup decoding's drafts so, ``tanglebox.lookup_decoding``). ``forget`` drops a slot's cached
positions from ``keep`` on, so a conversation's next turn can reuse its cached prefix.
All methods are called from the engine's thread only.

A backend that can constrain a reply to a grammar (``supports_grammar``; llama.cpp's GBNF
sampler) makes a :class:`TokenConstraint` per reply with ``grammar``; the engine's sampler asks
it whether a token is allowed, and frees it when the reply ends, however it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tanglebox.prompting import ModelChatFormat


class BackendError(Exception):
    """The model cannot be loaded as configured; the message says what to change."""


class GrammarError(ValueError):
    """A grammar cannot be used: it does not parse, or it allows no way on; says which."""


class TokenConstraint(Protocol):
    """What a reply may say next (a grammar), followed token by token."""

    def allows(self, token: int) -> bool:
        """Whether ``token`` may come next (checks one token: cheap)."""

    def restrict(self, logits: np.ndarray) -> np.ndarray:
        """A copy of ``logits`` with every token that may not come next at -inf."""

    def accept(self, token: int) -> None:
        """Move past ``token``, which must be allowed."""

    def close(self) -> None:
        """Free what it holds; later calls do nothing."""


@dataclass(frozen=True)
class DecodeItem:
    slot: int
    tokens: list[int]
    position: int  # where tokens[0] goes in the slot's sequence
    want_logits: bool = True
    # With want_logits: the last tokens that want logits. Above 1 (only for a backend with
    # ``verifies_drafts = True``) the item's logits are a 2-D array, a row per token.
    logits_count: int = 1


class Backend(Protocol):
    name: str  # "llama.cpp" or "transformers"
    model_name: str  # what users see, e.g. "SmolLM2-135M-Instruct.Q4_1.gguf"
    device: str
    context_length: int  # tokens per sequence
    max_sequences: int
    batch_tokens: int  # most tokens one decode call takes, over all items
    chat_format: ModelChatFormat
    supports_grammar: bool  # ``grammar`` is there; otherwise a grammar is refused at admission

    def tokenize(self, text: str) -> list[int]:
        """Prompt text to tokens: special tokens parsed, BOS added if the model wants one."""

    def token_bytes(self, token: int) -> bytes:
        """The bytes a generated token stands for (may be part of a UTF-8 character)."""

    def is_end_of_turn(self, token: int) -> bool:
        ...

    def decode(self, items: list[DecodeItem]) -> list[np.ndarray | None]:
        ...

    def forget(self, slot: int, keep: int) -> None:
        ...

    def grammar(self, gbnf: str) -> TokenConstraint:
        """A constraint to the GBNF grammar ``gbnf`` (root rule ``root``) for one reply;
        raises GrammarError when it cannot be used. Only where ``supports_grammar``."""

    def close(self) -> None:
        ...

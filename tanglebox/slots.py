"""The engine's slots: what each KV sequence holds, and which free slot a prompt goes to.

A backend holds ``max_sequences`` KV sequences; the engine gives each reply one (a *slot*) and
keeps, per slot, the tokens its cache holds after the reply ended, so a conversation's next
turn that starts with them reads only what is new. Choosing the slot is the whole policy:
the longest cached prefix first, then keeping busy slots consecutive, then the least recently
used. The engine's thread alone reads and writes slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from tanglebox.backends.base import Backend

# Cached prompt tokens worth less than keeping the busy slots consecutive: reading 32 prompt
# tokens again costs about 0.2 s on 2 CPU cores once, a second run of slots about 8 % of every
# step of every reply while it lasts (python -m bench.batch_order).
SLOT_PREFIX_SLACK = 32


@dataclass
class Slot:
    index: int
    tokens: list[int] = field(default_factory=list)  # what its KV cache holds
    last_used: float = 0.0
    busy: bool = False


def choose_slot(slots: list[Slot], free: list[Slot], tokens: list[int]) -> tuple[Slot, int]:
    """The free slot for ``tokens`` and how many of them its cache already holds.

    First the slot whose cache shares the longest prefix with ``tokens`` (for a conversation's
    next turn, its own slot). Slots within ``SLOT_PREFIX_SLACK`` tokens of that are as good:
    among them, one that keeps the busy slots in one run of consecutive indices (llama.cpp
    decodes each run of consecutive sequence ids in a pass of its own), then the longer
    prefix, then the least recently used."""
    prefixes = {slot.index: common_prefix(slot.tokens, tokens) for slot in free}
    longest = max(prefixes.values())
    busy = {slot.index for slot in slots if slot.busy}
    slot = max((slot for slot in free if prefixes[slot.index] >= longest - SLOT_PREFIX_SLACK),
               key=lambda s: ((s.index - 1 in busy) + (s.index + 1 in busy),
                              prefixes[s.index], -s.last_used))
    return slot, prefixes[slot.index]


def prepare_slot(slots: list[Slot], free: list[Slot], tokens: list[int], backend: Backend,
                 restore_prefix: Callable[[int, list[int], int], list[int] | None] | None
                 ) -> tuple[Slot, int]:
    """The slot for ``tokens``, made ready: a longer prefix saved on disk loaded into it where
    the backend keeps them (``restore_prefix``, llama.cpp), the rest of its cache dropped.
    Returns the slot and how many prompt tokens it keeps (never all: the last one is read
    again, for its logits). When the backend fails, the slot counts as empty (what it holds is
    unknown, so its next user clears it all) and the error goes on up."""
    slot, cached = choose_slot(slots, free, tokens)
    try:
        if restore_prefix is not None:
            held = restore_prefix(slot.index, tokens, cached)
            if held is not None:
                slot.tokens, cached = held, common_prefix(held, tokens)
        keep = min(cached, len(tokens) - 1)
        backend.forget(slot.index, keep)
    except Exception:
        slot.tokens.clear()
        raise
    del slot.tokens[keep:]
    return slot, keep


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens ``a`` and ``b`` share from their start."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n

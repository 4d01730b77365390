"""The order of the contestants in each round of a benchmark.

Benchmarks here run the things they compare in turns, in one invocation, on a shared machine:
reversing the order every other round keeps a slow drift of the machine from favouring whoever
always runs first.
"""

from __future__ import annotations

from typing import Sequence, TypeVar

T = TypeVar("T")


def in_round_order(contestants: Sequence[T], round_: int) -> list[T]:
    """Even rounds in the given order, odd rounds reversed: a machine that slowly speeds up or
    slows down favours no contestant over the whole benchmark."""
    return list(contestants) if round_ % 2 == 0 else list(reversed(contestants))

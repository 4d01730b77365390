"""llama-server contestants for ``bench.lookup``: llama.cpp's own n-gram speculation, side by
side with Tanglebox's lookup decoding, on the same prompts in the same rounds.

``python -m bench.lookup --llama-server PATH [--llama-server-spec ngram-simple,ngram-simple:3:8]``

One llama-server per contestant, each with the embedded model, ``-np`` = the most streams, the
same context per stream and the same threads as the engines: one with ``--spec-type none``
(its plain decoding) and one per spec type asked. Every reply is ``POST /completion``, streamed,
temperature 0, with the prompt exactly as Tanglebox renders it (``Engine.render``) and the same
token limit; ``cache_prompt`` stays on, as the engine reuses a slot's shared opening too, and
every round's prompts are new, so no reply comes from a cached prompt. Tokens are the server's
own count (the final event's ``timings``: ``predicted_n``; ``prompt_n`` + ``cache_n`` for the
prompt, to check that both tokenized the same prompt), with the drafted and accepted tokens
(``draft_n``, ``draft_n_accepted``) where it drafted any. Wall time runs from submitting to the
last reply's end, as for the engines.

What each ``--spec-type`` does in the llama.cpp that llama-cpp-python 0.3.36 vendors
(``common/speculative.cpp``, ``common/ngram-map.cpp``, ``common/ngram-cache.cpp``):

- ``ngram-simple``: prompt lookup proper. The last ``size-n`` tokens (default 12) are searched
  backwards in the slot's prompt and reply; the up to ``size-m`` tokens (default 48) after the
  most recent earlier occurrence are the draft (none when fewer than ``size-n`` would follow).
  Every generating slot drafts at every step; nothing backs off.
- ``ngram-map-k``, ``ngram-map-k4v``: the same lookup through a map of the n-grams seen, with a
  count of hits (``min-hits``) and of the tokens last accepted per draft; k4v keeps up to 4
  continuations per n-gram.
- ``ngram-mod``: a hash of 24-token n-grams shared by every slot and request, drafts of 48 to
  64 tokens: meant for long contexts sent again and again (an agent re-sending files).
- ``ngram-cache``: the ``llama-lookup`` example's statistics (1- to 4-grams of the slot's
  context, optionally corpus files), drafts of up to 8 tokens by the likeliest continuation.

Tanglebox's lookup decoding is ``ngram-simple``'s algorithm (the last 3, then 2, tokens looked
up in the prompt and reply, the tokens after the most recent match drafted) with small drafts
(2 doubling to 8) that back off where they fail and only for a reply alone in its step. So the
default contestants are ``ngram-simple`` twice: at llama.cpp's own sizes (what a user of
``--spec-type ngram-simple`` gets) and at Tanglebox's sizes (``ngram-simple:3:8``: a 3-token
key, drafts of up to 8), which separates the algorithm's cost from the choice of sizes.
``TYPE:N:M`` sets ``size-n`` and ``size-m`` for the three lookup types; the others run as
llama.cpp configures them.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import requests

from bench.clients import post_streamed
from bench.servers import ServerProcess, start_llama_server

DEFAULT_SPECS = "ngram-simple,ngram-simple:3:8"
SPEC_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v", "ngram-mod", "ngram-cache")
SIZED_TYPES = ("ngram-simple", "ngram-map-k", "ngram-map-k4v")  # take --spec-TYPE-size-n/-m


@dataclass(frozen=True)
class Speculation:
    """One llama-server contestant: a ``--spec-type`` and the flags that configure it."""

    label: str  # as asked, e.g. "ngram-simple:3:8"; "none" for plain decoding
    flags: tuple[str, ...]


def parse_specs(text: str) -> list[Speculation]:
    """``none`` (plain decoding, always first) and one contestant per ``TYPE[:N:M]`` in the
    comma-separated ``text``."""
    found = [Speculation("none", ("--spec-type", "none"))]
    for label in (part.strip() for part in text.split(",")):
        if not label or label == "none":
            continue
        kind, *sizes = label.split(":")
        if kind not in SPEC_TYPES:
            raise ValueError(f"unknown llama-server spec type {kind!r}; one of "
                             f"{', '.join(SPEC_TYPES)}")
        flags = ("--spec-type", kind)
        if sizes:
            if kind not in SIZED_TYPES or len(sizes) != 2 or not all(s.isdigit() for s in sizes):
                raise ValueError(f"{label!r}: TYPE:N:M (n-gram and draft sizes) applies to "
                                 f"{', '.join(SIZED_TYPES)}")
            flags += (f"--spec-{kind}-size-n", sizes[0], f"--spec-{kind}-size-m", sizes[1])
        found.append(Speculation(label, flags))
    return found


@dataclass(frozen=True)
class ServerCounts:
    """What llama-server's final event says of one reply (its ``timings``)."""

    prompt_tokens: int  # read now (prompt_n) + reused from the slot's last prompt (cache_n)
    tokens: int  # generated (predicted_n)
    drafted: int  # draft tokens sent to the model (draft_n; absent when none)
    accepted: int  # of which the model agreed with (draft_n_accepted)
    decode_rate: float = 0.0  # generated tokens per second of generation (predicted_per_second)


def server_counts(final: dict) -> ServerCounts:
    """The counts in llama-server's last ``/completion`` event (``stop`` true)."""
    timings = final.get("timings") or {}
    return ServerCounts(int(timings.get("prompt_n", 0)) + int(timings.get("cache_n", 0)),
                        int(timings.get("predicted_n", final.get("tokens_predicted", 0))),
                        int(timings.get("draft_n", 0)), int(timings.get("draft_n_accepted", 0)),
                        float(timings.get("predicted_per_second", 0.0)))


@dataclass
class Measured:
    """One contestant's run of one workload at one stream count, in one round."""

    tokens: int  # all replies' tokens, as the contestant counted them
    seconds: float  # wall time from submitting to the last reply's end
    replies: list[str]
    prompt_tokens: list[int]
    drafted: int = 0
    accepted: int = 0
    errors: list[str] = field(default_factory=list)
    # Each reply's decoding speed, its prompt's reading left out: tokens per second after its
    # first token (the engine's timings.tokensPerSecond; llama-server's predicted_per_second).
    decode_rates: list[float] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """All replies' tokens per second of wall time."""
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def decode_rate(self) -> float:
        """The replies' decoding speed (median of ``decode_rates``)."""
        return statistics.median(self.decode_rates) if self.decode_rates else 0.0


class LlamaServerContestant:
    """A llama-server started for one ``Speculation``; ``run`` answers K prompts at once."""

    def __init__(self, server: ServerProcess, label: str, render: Callable[[str], str]) -> None:
        self.server = server
        self.name = f"llama-server {label}"
        self.render = render  # a user message as Tanglebox renders it into the model's prompt

    @classmethod
    def start(cls, binary: Path, model: Path, speculation: Speculation, slots: int,
              context_per_stream: int, threads: int, folder: Path,
              render: Callable[[str], str]) -> "LlamaServerContestant":
        server = start_llama_server(binary, model, slots, context_per_stream, threads, folder,
                                    extra_args=speculation.flags,
                                    name="llama-server-" + speculation.label.replace(":", "-"))
        return cls(server, speculation.label, render)

    def run(self, texts: list[str], max_tokens: int) -> Measured:
        """Every text as one streamed ``/completion`` on its own connection, all at once."""
        sessions = [requests.Session() for _ in texts]
        for session in sessions:  # connect before the clock starts, as the engine needs none
            session.get(self.server.url + "/health", timeout=30)
        bodies = [{"prompt": self.render(text), "n_predict": max_tokens, "temperature": 0,
                   "stream": True, "cache_prompt": True} for text in texts]
        finals: list[dict] = [{} for _ in texts]
        texts_out = [""] * len(texts)
        errors: list[str] = []

        def ask(i: int) -> None:
            def ends(event: dict) -> bool:
                if event.get("stop"):
                    finals[i] = event
                return bool(event.get("stop"))

            reply = post_streamed(sessions[i], self.server.url + "/completion", bodies[i],
                                   lambda event: event.get("content"), ends)
            texts_out[i] = reply.text
            if reply.error:
                errors.append(reply.error)

        askers = [threading.Thread(target=ask, args=(i,)) for i in range(len(texts))]
        started = time.monotonic()
        for asker in askers:
            asker.start()
        for asker in askers:
            asker.join()
        seconds = time.monotonic() - started
        for session in sessions:
            session.close()
        counts = [server_counts(final) for final in finals]
        return Measured(sum(c.tokens for c in counts), seconds, texts_out,
                        [c.prompt_tokens for c in counts], sum(c.drafted for c in counts),
                        sum(c.accepted for c in counts), errors,
                        [c.decode_rate for c in counts])

    def stop(self) -> None:
        self.server.stop()


def median_range(ratios: list[float]) -> str:
    """``median (lowest–highest)`` of per-round ratios, two decimals."""
    if not ratios:
        return "—"
    ratios = sorted(ratios)
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f})"


def per_round(numerators: list[Measured], denominators: list[Measured],
              rate: str = "rate") -> str:
    """The ratio of two contestants' tokens/s (``rate``, or ``decode_rate``: decoding only)
    taken round by round, as ``median_range``."""
    return median_range([getattr(a, rate) / getattr(b, rate)
                         for a, b in zip(numerators, denominators) if getattr(b, rate)])


def same_replies(these: list[Measured], those: list[Measured]) -> str:
    """How many replies are the same text in both: ``k of n``."""
    pairs = [(a, b) for x, y in zip(these, those) for a, b in zip(x.replies, y.replies)]
    return f"{sum(a == b for a, b in pairs)} of {len(pairs)}"


def first_difference(these: list[Measured], those: list[Measured]) -> str:
    """Where the first pair of replies that differ parts (``""`` when all are the same): greedy
    replies part where two builds' sums round a near tie differently."""
    for a, b in ((a, b) for x, y in zip(these, those) for a, b in zip(x.replies, y.replies)
                 if a != b):
        at = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
        return f"at character {at}: {a[max(0, at - 30):at + 30]!r} against " \
               f"{b[max(0, at - 30):at + 30]!r}"
    return ""


def side_by_side(runs: dict[str, list[Measured]], speculations: list[Speculation]) -> list[str]:
    """The rows of one workload at one stream count: Tanglebox off and on, then llama-server
    plain and each spec type (``runs`` by contestant: "off", "on", "llama-server LABEL")."""
    on, off = runs["on"], runs["off"]
    plain = runs["llama-server none"]

    def drafts(measured: list[Measured]) -> str:
        drafted = sum(m.drafted for m in measured)
        return f"{sum(m.accepted for m in measured)} of {drafted}" if drafted else "none"

    def rate(measured: list[Measured], which: str = "rate") -> str:
        return f"{statistics.median(getattr(m, which) for m in measured):.1f}"

    def decoding(measured: list[Measured], versus: list[Measured] | None) -> list[str]:
        return [rate(measured, "decode_rate"),
                per_round(measured, versus, "decode_rate") if versus else "—"]

    rows = [["Tanglebox off", rate(off), "—", per_round(on, off), "—", "—", "—",
             *decoding(off, None)],
            ["Tanglebox on", rate(on), per_round(on, off), "—", same_replies(on, off), "—",
             drafts(on), *decoding(on, off)]]
    for speculation in speculations:
        measured = runs[f"llama-server {speculation.label}"]
        if speculation.label == "none":
            rows.append([f"llama-server {speculation.label}", rate(measured), "—",
                         per_round(on, measured), "—", same_replies(measured, off), "—",
                         *decoding(measured, None)])
        else:
            rows.append([f"llama-server {speculation.label}", rate(measured),
                         per_round(measured, plain), per_round(on, measured),
                         same_replies(measured, plain), same_replies(measured, on),
                         drafts(measured), *decoding(measured, plain)])
    return rows


SIDE_BY_SIDE_HEADER = ("| workload | streams | contestant | tokens/s | ÷ its plain decoding "
                       "(median, range) | Tanglebox on ÷ this (median, range) | same replies "
                       "as its plain decoding | same text as Tanglebox | drafts accepted of "
                       "drafted | decoding only: tokens/s | decoding only: ÷ its plain "
                       "decoding |\n|---|---|---|---|---|---|---|---|---|---|---|")

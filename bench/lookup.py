"""Lookup decoding on against off, through the Engine on the embedded model, in one run.

``python -m bench.lookup [--streams 1,8] [--tokens 128] [--rounds 3] [--llama-server PATH
[--llama-server-spec ngram-simple,ngram-simple:3:8]]``

Two engines on the same model (each its own llama.cpp context with as many slots as the most
streams): one with ``lookupDecoding`` on, one with it off. Two workloads, at temperature 0:

- edit: "repeat this code / text with a change" (the replies copy most of the prompt: what
  lookup decoding is for);
- chat: the stories ``bench.engine_batched`` asks (replies that repeat little: lookup decoding
  must back off and cost nothing).

Each round asks every workload at every stream count of both engines, one after the other, in
reverse order every other round (``rounds.in_round_order``), with prompts no earlier run asked
(numbered anew for every stream count too, so no reply comes from a cached prompt). Aggregate
tokens/s = all tokens / wall time from submitting to the last reply's end; the ratio on/off is
taken per round and reported as its median (and range). Greedy replies are the same either
way, so both engines generate the same tokens.

With ``--llama-server PATH`` the same rounds, in the same alternating order, also ask llama.cpp's
own server the same prompts (rendered as Tanglebox renders them): plain (``--spec-type none``)
and with its n-gram speculation (``--llama-server-spec``; what each type does, and why the
default is ``ngram-simple`` at llama.cpp's sizes and at Tanglebox's, in
``bench/lookup_llama_server.py``). A second table then gives every contestant's tokens/s, its
ratio to its own plain decoding and Tanglebox-on's ratio to it (per round: median, range),
whether its replies are its plain decoding's and Tanglebox's text, and the drafted and
accepted tokens each reports.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from bench.engine_batched import prompts as chat_prompts
from bench.lookup_llama_server import (DEFAULT_SPECS, SIDE_BY_SIDE_HEADER, LlamaServerContestant,
                                       Measured, Speculation, first_difference, parse_specs,
                                       per_round, same_replies, side_by_side)
from bench.machine import OtherLoad, cpu_model, load_average
from bench.rounds import in_round_order
from bench.servers import llama_server_libraries
from tanglebox.backends.llama_cpp_backend import LlamaCppBackend, cpu_threads
from tanglebox.chat_request import ChatRequest
from tanglebox.engine import Done, Engine
from tanglebox.model_location import embedded_model_path
from tanglebox.prompting import USER, Message

CONTEXT_PER_STREAM = 1024
SNIPPETS = (
    ("Copy this text word for word, but change every 'cat' to 'dog'",
     "The cat sat on the mat. The cat looked at the bird. The bird looked at the cat. Then "
     "the cat went to sleep on the mat, and the bird flew away over the old red barn. In the "
     "morning the cat woke up, ate its breakfast, and sat by the window to watch the rain."),
    ("Rewrite this JSON exactly, but set \"enabled\" to false",
     '{"name": "backup", "enabled": true, "schedule": "daily", "keep": 7, '
     '"paths": ["/home", "/etc", "/var/lib/postgres"], "compress": true, '
     '"notify": {"email": "ops@example.com", "on": ["failure", "success"]}}'),
    ("Copy this Python code word for word, but rename the function to sum_with_tax",
     "def total(prices, tax):\n    result = 0\n    for price in prices:\n"
     "        result = result + price\n    return result * (1 + tax)\n"),
    ("Copy this paragraph word for word, but change 'Monday' to 'Friday'",
     "On Monday the team met at nine to plan the release. Everyone agreed that the tests must "
     "pass before the release, that the notes must be written before the release, and that "
     "the release would go out on Monday afternoon if nothing went wrong."),
)


def edit_prompts(k: int, round_: int) -> list[str]:
    """K edit requests no earlier round asked."""
    return [f"Task {round_}.{i + 1}. {SNIPPETS[i % len(SNIPPETS)][0]}:\n\n"
            f"{SNIPPETS[i % len(SNIPPETS)][1]}" for i in range(k)]


WORKLOADS = {"edit": edit_prompts, "chat": chat_prompts}


def request(text: str, max_tokens: int, i: int = 0) -> ChatRequest:
    """The request every contestant answers for ``text`` (llama-server gets it rendered)."""
    return ChatRequest((Message(USER, text),), "", 0.0, max_tokens, client_id=str(i))


def run(engine: Engine, texts: list[str], max_tokens: int) -> Measured:
    """All replies' tokens per second of wall time (the replies read by a thread each), the
    replies, and the draft tokens this run sent and had accepted."""
    drafted, accepted = engine.lookup.drafted, engine.lookup.accepted
    generations = [engine.submit(request(text, max_tokens, i)) for i, text in enumerate(texts)]
    started = time.monotonic()
    done: list[Done | None] = [None] * len(texts)

    def consume(i: int) -> None:
        for event in generations[i].events():
            if isinstance(event, Done):
                done[i] = event

    consumers = [threading.Thread(target=consume, args=(i,)) for i in range(len(texts))]
    for consumer in consumers:
        consumer.start()
    for consumer in consumers:
        consumer.join()
    seconds = time.monotonic() - started
    finished = [d for d in done if d is not None]
    return Measured(sum(d.completion_tokens for d in finished), seconds,
                    [d.text if d is not None else "" for d in done],
                    [d.prompt_tokens if d is not None else 0 for d in done],
                    engine.lookup.drafted - drafted, engine.lookup.accepted - accepted,
                    ["no reply"] * (len(texts) - len(finished)),
                    [d.timings.get("tokensPerSecond", 0.0) for d in finished])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,8", help="stream counts, comma-separated")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--llama-server", type=Path, metavar="PATH",
                        help="llama.cpp's llama-server binary: add its plain decoding and its "
                             "n-gram speculation to every round (bench/lookup_llama_server.py)")
    parser.add_argument("--llama-server-spec", default=DEFAULT_SPECS, metavar="TYPE[:N:M],...",
                        help="llama-server's --spec-type contestants besides none (default "
                             f"{DEFAULT_SPECS}; N:M sets the n-gram and draft sizes)")
    args = parser.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]
    speculations = parse_specs(args.llama_server_spec) if args.llama_server else []

    path = embedded_model_path()
    engines = {}
    for name, lookup in (("on", True), ("off", False)):
        backend = LlamaCppBackend(path, CONTEXT_PER_STREAM, max(streams), 0, "cpu")
        engines[name] = Engine(backend, "auto", lookup_decoding=lookup)
        engines[name].start()
    contestants: dict[str, Callable[[list[str], int], Measured]] = {
        name: functools.partial(run, engine) for name, engine in engines.items()}
    servers: list[LlamaServerContestant] = []
    load_before = load_average()
    measured: dict[tuple[str, int, str], list[Measured]] = {}
    try:
        if speculations:
            folder = Path(tempfile.mkdtemp(prefix="tanglebox-lookup-"))
            render = lambda text: engines["off"].render(request(text, args.tokens)).text  # noqa: E731
            for speculation in speculations:
                servers.append(LlamaServerContestant.start(
                    args.llama_server, path, speculation, max(streams), CONTEXT_PER_STREAM,
                    cpu_threads(), folder, render))
                contestants[servers[-1].name] = servers[-1].run
        for contestant in contestants.values():  # warm-up: page faults, allocations
            contestant(edit_prompts(max(streams), 0), 16)
        # Read while the servers run (their /proc/PID/maps is gone once they stop).
        libraries = llama_server_libraries(servers[0].server) if servers else ""
        meter = OtherLoad([os.getpid()] + [server.server.pid() for server in servers])
        fresh = itertools.count(1)  # a new prompt number for every run
        for round_ in range(1, args.rounds + 1):
            for workload, make_prompts in WORKLOADS.items():
                for k in streams:
                    texts = make_prompts(k, next(fresh))
                    for name in in_round_order(list(contestants), round_):
                        measured.setdefault((workload, k, name), []).append(
                            contestants[name](texts, args.tokens))
        other = meter.fraction()
    finally:
        for engine in engines.values():
            engine.stop(drain_seconds=1)
        for server in servers:
            server.stop()
    lookup = engines["on"].lookup
    print(f"CPU: {cpu_model() or 'unknown'}, {os.cpu_count()} cores; load average "
          f"{load_before[0]:.1f} before, {load_average()[0]:.1f} after; other processes took "
          f"{other:.0%} of the CPU during the rounds")
    print(f"model {path.name}; {args.tokens} tokens at most per reply, temperature 0; "
          f"{args.rounds} rounds; drafts accepted {lookup.accepted} of {lookup.drafted} "
          f"drafted tokens\n")
    print("| workload | streams | off tokens/s | on tokens/s | on ÷ off (median, range) "
          "| same replies | longest reply off, on (characters) | decoding only: on ÷ off |")
    print("|---|---|---|---|---|---|---|---|")
    for workload in WORKLOADS:
        for k in streams:
            on, off = measured[(workload, k, "on")], measured[(workload, k, "off")]
            longest = {name: max(len(text) for m in measured[(workload, k, name)]
                                 for text in m.replies) for name in engines}
            print(f"| {workload} | {k} | {statistics.median(m.rate for m in off):.1f} | "
                  f"{statistics.median(m.rate for m in on):.1f} | {per_round(on, off)} | "
                  f"{same_replies(on, off)} | {longest['off']}, {longest['on']} | "
                  f"{per_round(on, off, 'decode_rate')} |")
    if servers:
        print_side_by_side(measured, speculations, streams, libraries)


def print_side_by_side(measured: dict[tuple[str, int, str], list[Measured]],
                       speculations: list[Speculation], streams: list[int],
                       libraries: str) -> None:
    """The llama-server contestants beside Tanglebox's, and whether they read the same prompt
    (``libraries``: which libllama/libggml llama-server ran, ``llama_server_libraries``)."""
    print(f"\n{libraries}")
    tanglebox = [n for w in WORKLOADS for k in streams for m in measured[(w, k, "off")]
                 for n in m.prompt_tokens]
    theirs = [n for w in WORKLOADS for k in streams
              for m in measured[(w, k, "llama-server none")] for n in m.prompt_tokens]
    print(f"prompt tokens: the same count on Tanglebox and llama-server for "
          f"{sum(a == b for a, b in zip(tanglebox, theirs))} of {len(tanglebox)} prompts "
          f"(Tanglebox {min(tanglebox)}–{max(tanglebox)}, llama-server "
          f"{min(theirs)}–{max(theirs)} tokens)")
    errors = [e for runs in measured.values() for m in runs for e in m.errors]
    if errors:
        print(f"errors: {len(errors)}, first: {errors[0]}")
    print("same text as Tanglebox: llama-server none against Tanglebox off, a spec type "
          "against Tanglebox on")
    for workload in WORKLOADS:
        for k in streams:
            parted = first_difference(measured[(workload, k, "off")],
                                      measured[(workload, k, "llama-server none")])
            if parted:
                print(f"- {workload}, {k} streams: Tanglebox off and llama-server none part "
                      f"{parted}")
    print()
    print(SIDE_BY_SIDE_HEADER)
    for workload in WORKLOADS:
        for k in streams:
            runs = {name: m for (w, n, name), m in measured.items() if (w, n) == (workload, k)}
            for row in side_by_side(runs, speculations):
                print(f"| {workload} | {k} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()

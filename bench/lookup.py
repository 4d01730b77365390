"""Lookup decoding on against off, through the Engine on the embedded model, in one run.

``python -m bench.lookup [--streams 1,8] [--tokens 128] [--rounds 3]``

Two engines on the same model (each its own llama.cpp context with as many slots as the most
streams): one with ``lookupDecoding`` on, one with it off. Two workloads, at temperature 0:

- edit: "repeat this code / text with a change" (the replies copy most of the prompt: what
  lookup decoding is for);
- chat: the stories ``bench.engine_batched`` asks (replies that repeat little: lookup decoding
  must back off and cost nothing).

Each round asks every workload at every stream count of both engines, one after the other, in
reverse order every other round (``rounds.in_round_order``), with prompts no earlier round asked
(no reply from a cached prompt). Aggregate tokens/s = all tokens / wall time from submitting to
the last reply's end; the ratio on/off is taken per round and reported as its median (and
range). Greedy replies are the same either way, so both engines generate the same tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

from bench.engine_batched import prompts as chat_prompts
from bench.machine import OtherLoad, cpu_model, load_average
from bench.rounds import in_round_order
from tanglebox.backends.llama_cpp_backend import LlamaCppBackend
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


def run(engine: Engine, texts: list[str], max_tokens: int) -> tuple[float, list[str]]:
    """All replies' tokens per second of wall time (the replies read by a thread each), and
    the replies."""
    generations = [engine.submit(ChatRequest((Message(USER, text),), "", 0.0, max_tokens,
                                             client_id=str(i)))
                   for i, text in enumerate(texts)]
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
    replies = [d.text if d is not None else "" for d in done]
    return sum(d.completion_tokens for d in done if d is not None) / seconds, replies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", default="1,8", help="stream counts, comma-separated")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    streams = [int(s) for s in args.streams.split(",")]

    path = embedded_model_path()
    engines = {}
    for name, lookup in (("on", True), ("off", False)):
        backend = LlamaCppBackend(path, CONTEXT_PER_STREAM, max(streams), 0, "cpu")
        engines[name] = Engine(backend, "auto", lookup_decoding=lookup)
        engines[name].start()
    load_before = load_average()
    rates: dict[tuple[str, int, str], list[float]] = {}
    replies: dict[tuple[str, int, str], list[str]] = {}
    try:
        for engine in engines.values():  # warm-up: page faults, allocations
            run(engine, edit_prompts(max(streams), 0), 16)
        meter = OtherLoad([os.getpid()])
        for round_ in range(1, args.rounds + 1):
            for workload, make_prompts in WORKLOADS.items():
                for k in streams:
                    texts = make_prompts(k, round_)
                    for name in in_round_order(list(engines), round_):
                        rate, texts_out = run(engines[name], texts, args.tokens)
                        rates.setdefault((workload, k, name), []).append(rate)
                        replies.setdefault((workload, k, name), []).extend(texts_out)
        other = meter.fraction()
    finally:
        for engine in engines.values():
            engine.stop(drain_seconds=1)
    lookup = engines["on"].lookup
    print(f"CPU: {cpu_model() or 'unknown'}, {os.cpu_count()} cores; load average "
          f"{load_before[0]:.1f} before, {load_average()[0]:.1f} after; other processes took "
          f"{other:.0%} of the CPU during the rounds")
    print(f"model {path.name}; {args.tokens} tokens at most per reply, temperature 0; "
          f"{args.rounds} rounds; drafts accepted {lookup.accepted} of {lookup.drafted} "
          f"drafted tokens\n")
    print("| workload | streams | off tokens/s | on tokens/s | on ÷ off (median, range) "
          "| same replies | longest reply off, on (characters) |")
    print("|---|---|---|---|---|---|---|")
    for workload in WORKLOADS:
        for k in streams:
            on, off = rates[(workload, k, "on")], rates[(workload, k, "off")]
            ratios = sorted(a / b for a, b in zip(on, off))
            pairs = list(zip(replies[(workload, k, "on")], replies[(workload, k, "off")]))
            same = sum(a == b for a, b in pairs)
            longest = {name: max(len(text) for text in replies[(workload, k, name)])
                       for name in engines}
            print(f"| {workload} | {k} | {statistics.median(off):.1f} | "
                  f"{statistics.median(on):.1f} | {statistics.median(ratios):.2f} "
                  f"({ratios[0]:.2f}–{ratios[-1]:.2f}) | {same} of {len(pairs)} | "
                  f"{longest['off']}, {longest['on']} |")


if __name__ == "__main__":
    main()

"""K streams through the engine, in process, vs the direct batched loop, in one run.

``python -m bench.engine_batched [--streams 8] [--tokens 128] [--rounds 3] [--greenlets]``

Separates the engine's cost from the serving path's: no sockets, no HTTP, no client processes.
Each round runs, back to back on the same K prompts at temperature 0:

- direct: llama-cpp-python's low-level batch API (``bench/direct.py``, the serving benchmark's
  yardstick): K prompts prefilled together, then one ``llama_decode`` per step;
- engine: Tanglebox's Engine + llama.cpp backend with K slots; K consumers (threads, or with
  ``--greenlets`` greenlets in a gevent-patched process, as in the server) read the events.

Aggregate tokens/s = all tokens / wall time from submitting to the last reply's end, for both.
Every round asks new prompts, so no reply comes from a cached prompt (the engine still reuses
the template's shared opening, as it does when serving).
"""

from __future__ import annotations

import sys

if "--greenlets" in sys.argv:  # patch before anything imports threading
    from gevent import monkey
    monkey.patch_all()

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from tanglebox.backends.llama_cpp_backend import LlamaCppBackend  # noqa: E402
from bench.direct import DirectModel  # noqa: E402
from tanglebox.chat_request import ChatRequest  # noqa: E402
from tanglebox.engine import Done, Engine  # noqa: E402
from tanglebox.model_location import embedded_model_path  # noqa: E402
from tanglebox.prompting import USER, Message  # noqa: E402

TOPICS = ("a dragon", "a lighthouse", "a robot", "the sea", "a city", "a forest", "a clock",
          "a ship")
CONTEXT_PER_STREAM = 1024


def prompts(k: int, round_: int) -> list[str]:
    """K prompts no earlier round asked, so no reply comes from a cached prompt."""
    return [f"Story {round_}.{i + 1}: write a long story about {TOPICS[i % len(TOPICS)]}."
            for i in range(k)]


def engine_run(engine: Engine, k: int, round_: int, max_tokens: int) -> float:
    generations = [engine.submit(ChatRequest((Message(USER, text),), "", 0.0, max_tokens,
                                             client_id=str(i)))
                   for i, text in enumerate(prompts(k, round_))]
    started = time.monotonic()
    done: list[Done | None] = [None] * k

    def consume(i: int) -> None:
        for event in generations[i].events():
            if isinstance(event, Done):
                done[i] = event

    consumers = [threading.Thread(target=consume, args=(i,)) for i in range(k)]
    for consumer in consumers:
        consumer.start()
    for consumer in consumers:
        consumer.join()
    seconds = time.monotonic() - started
    return sum(d.completion_tokens for d in done) / seconds


def direct_run(model: DirectModel, engine: Engine, k: int, round_: int, max_tokens: int) -> float:
    tokens = [model.tokenize(engine.render(ChatRequest((Message(USER, text),), "", 0.0, 1)).text)
              for text in prompts(k, round_)]
    started = time.monotonic()
    streams = model.generate(tokens, max_tokens)
    return sum(len(s.token_times) for s in streams) / (time.monotonic() - started)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--greenlets", action="store_true",
                        help="consumers are greenlets in a gevent-patched process (as served)")
    args = parser.parse_args(argv)

    path = embedded_model_path()
    backend = LlamaCppBackend(path, CONTEXT_PER_STREAM, args.streams, 0, "cpu")
    engine = Engine(backend, "auto")
    engine.start()
    model = DirectModel(path)
    engine_run(engine, args.streams, 0, 16)  # warm-up: page faults, allocations
    direct_run(model, engine, args.streams, 0, 16)
    rates: dict[str, list[float]] = {"direct": [], "engine": []}
    try:
        for round_ in range(1, args.rounds + 1):
            rates["direct"].append(direct_run(model, engine, args.streams, round_, args.tokens))
            rates["engine"].append(engine_run(engine, args.streams, round_, args.tokens))
    finally:
        engine.stop(drain_seconds=1)
    direct, served = (statistics.median(rates[name]) for name in ("direct", "engine"))
    consumers = "greenlets (gevent)" if args.greenlets else "threads"
    print(f"machine: {platform.machine()}, Python {platform.python_version()}; model {path.name}; "
          f"{args.streams} streams x {args.tokens} tokens, temperature 0; consumers: {consumers}; "
          f"{args.rounds} rounds, medians\n")
    print("| path | tokens/s (all streams) | ÷ direct |")
    print("|---|---|---|")
    print(f"| llama-cpp-python direct batched | {direct:.1f} | 1.00 |")
    print(f"| Tanglebox engine, {args.streams} slots | {served:.1f} | {served / direct:.2f} |")


if __name__ == "__main__":
    main()

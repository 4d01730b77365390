"""KV cache precision (``kvCacheType``): memory per token of context and decoding speed, in one run.

``python -m bench.kv_cache_types [--types f16,q8_0,q4_0] [--streams 1,8] [--context 1024]
[--tokens 64] [--rounds 3]``, from the repository root.

For each type, a Tanglebox engine with the llama.cpp backend on the embedded model (or
``--model``), ``max(--streams)`` slots of ``--context`` tokens, all loaded at once. Each round,
for each K in ``--streams`` and each type in turn (reversed every other round), K replies of
``--tokens`` tokens at temperature 0, each after a prompt of about ``--context / 2`` tokens that
no earlier round asked (so the attention over a long context is part of every step, which is
where the cache's precision shows). Reported, medians over the rounds:

- **KV bytes per token**: the size of one slot's saved sequence state
  (``llama_state_seq_get_size``) over the tokens it holds: what each token of context costs
  in memory, so ``contextLength × parallelSlots ×`` it is the cache's size;
- **TTFT**: the median time from submitting to a reply's first token (reading the prompt);
- **decoding tokens/s**: once all K replies generate, their tokens over the time to the last
  one's end, and its ratio to f16 (median of the per-round ratios);
- whether the greedy replies are the same as f16's (a quantized cache changes the numbers the
  attention sees, so replies may drift after a while).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import llama_cpp

from bench.machine import cpu_model, load_average
from bench.rounds import in_round_order
from tanglebox.backends.llama_cpp_backend import KV_CACHE_TYPES, LlamaCppBackend
from tanglebox.chat_request import ChatRequest
from tanglebox.engine import Engine
from tanglebox.generation import Delta, Done
from tanglebox.model_location import embedded_model_path
from tanglebox.prompting import USER, Message

FILLER = ("The harbour town kept its lighthouse lit through every storm of the long winter, "
          "and the keeper wrote each night's weather in a book. ")


def prompt(context: int, round_: int, stream: int) -> str:
    """About ``context / 2`` tokens (the filler is ~25 tokens a sentence), unique per call."""
    sentences = max(1, context // 2 // 25)
    return (f"Notes {round_}.{stream}: " + FILLER * sentences
            + "Continue the keeper's notes for the next night.")


def run(engine: Engine, k: int, round_: int, context: int,
        tokens: int) -> tuple[float, float, list[str]]:
    """K replies at once: the decoding rate once all K are generating (tokens after each
    reply's first, over the time from the last first token to the last end), the median time
    to first token (the prompt's reading) in seconds, and the replies' texts."""
    generations = [engine.submit(ChatRequest((Message(USER, prompt(context, round_, i)),), "",
                                             0.0, tokens, client_id=str(i)))
                   for i in range(k)]
    started = time.monotonic()
    done: list[Done | None] = [None] * k
    first: list[float] = [0.0] * k
    ended: list[float] = [0.0] * k

    def consume(i: int) -> None:
        for event in generations[i].events():
            if isinstance(event, Delta) and not first[i]:
                first[i] = time.monotonic()
            if isinstance(event, Done):
                done[i], ended[i] = event, time.monotonic()

    consumers = [threading.Thread(target=consume, args=(i,)) for i in range(k)]
    for consumer in consumers:
        consumer.start()
    for consumer in consumers:
        consumer.join()
    finished = [d for d in done if d is not None]
    decoding = max(ended) - max(first)
    rate = sum(d.completion_tokens - 1 for d in finished) / decoding if decoding > 0 else 0.0
    return rate, statistics.median(f - started for f in first), [d.text for d in finished]


def bytes_per_token(backend: LlamaCppBackend, slot_tokens: int) -> float:
    """One slot's cached sequence, in bytes of saved state per token it holds."""
    size = llama_cpp.llama_state_seq_get_size(backend._ctx, 0)
    return size / slot_tokens if slot_tokens else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kv_cache_types",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="f16,q8_0,q4_0")
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--context", type=int, default=1024, help="tokens per slot")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per reply")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args(argv)
    types = [t for t in args.types.split(",") if t]
    unknown = [t for t in types if t not in KV_CACHE_TYPES]
    if unknown or "f16" not in types:
        parser.error(f"--types: from {', '.join(KV_CACHE_TYPES)}, f16 included")
    ks = [int(k) for k in args.streams.split(",")]
    path = args.model or embedded_model_path()

    engines: dict[str, Engine] = {}
    for kv_type in types:
        backend = LlamaCppBackend(path, args.context, max(ks), 0, "cpu", kv_cache_type=kv_type)
        engines[kv_type] = Engine(backend, "auto")
        engines[kv_type].start()
    rates: dict[tuple[str, int], list[float]] = {}
    ratios: dict[tuple[str, int], list[float]] = {}
    ttfts: dict[tuple[str, int], list[float]] = {}
    same: dict[tuple[str, int], list[bool]] = {}
    per_token: dict[str, float] = {}
    loads = [load_average()]
    try:
        for engine in engines.values():  # warm-up: page faults, allocations
            run(engine, 1, 0, 128, 8)
        for round_ in range(1, args.rounds + 1):
            print(f"round {round_} of {args.rounds}", file=sys.stderr, flush=True)
            for k in ks:
                texts: dict[str, list[str]] = {}
                for kv_type in in_round_order(types, round_):
                    rate, ttft, texts[kv_type] = run(engines[kv_type], k, round_,
                                                     args.context, args.tokens)
                    rates.setdefault((kv_type, k), []).append(rate)
                    ttfts.setdefault((kv_type, k), []).append(ttft)
                    print(f"  {kv_type:<5} K={k}: {rate:6.1f} tokens/s decoding, "
                          f"TTFT {ttft * 1000:.0f} ms", file=sys.stderr, flush=True)
                for kv_type in types:
                    key = (kv_type, k)
                    ratios.setdefault(key, []).append(rates[key][-1] / rates[("f16", k)][-1])
                    same.setdefault(key, []).append(texts[kv_type] == texts["f16"])
        for kv_type, engine in engines.items():
            backend = engine.backend
            slot_tokens = len(backend.tokenize(prompt(args.context, args.rounds, 0))) + args.tokens
            per_token[kv_type] = bytes_per_token(backend, slot_tokens)
        loads.append(load_average())
    finally:
        for engine in engines.values():
            engine.stop(drain_seconds=1)
    print(f"machine: {cpu_model() or 'unknown CPU'}; model {path.name}; {args.context} tokens "
          f"per slot, prompts of ~{args.context // 2}, {args.tokens} tokens per reply at "
          f"temperature 0; {args.rounds} rounds, medians; load average before "
          f"{loads[0][0]:.2f}, after {loads[-1][0]:.2f}\n")
    print("| kvCacheType | K | KV bytes per token | KV MiB per slot | TTFT p50 ms "
          "| decoding tokens/s (all K) | ÷ f16 | same greedy text as f16 |")
    print("|---|---|---|---|---|---|---|---|")
    for k in ks:
        for kv_type in types:
            key = (kv_type, k)
            print(f"| {kv_type} | {k} | {per_token[kv_type]:,.0f} | "
                  f"{per_token[kv_type] * args.context / 2**20:.1f} | "
                  f"{statistics.median(ttfts[key]) * 1000:.0f} | "
                  f"{statistics.median(rates[key]):.1f} | {statistics.median(ratios[key]):.2f} | "
                  f"{sum(same[key])} of {len(same[key])} rounds |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

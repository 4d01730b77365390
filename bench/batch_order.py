"""What the order of sequences in a batch costs llama.cpp, in one run.

``python -m bench.batch_order [--streams 8] [--tokens 128] [--rounds 3]``

With a KV stream per sequence (``kv_unified = false``, as the llama.cpp backend and llama-server
use), llama.cpp splits a batch into one pass over the model per run of consecutive sequence ids
in it. A server whose streams end and start at different times lists its sequences in any
order unless it sorts them; this measures, on the direct batched loop (``bench/direct.py``),
K greedy streams with each step's batch in ascending ids (one pass), rotated (two runs) and
reversed (K runs). Rounds interleave the orders, so drift on a shared machine hits each alike.
"""

from __future__ import annotations

import argparse
import platform
import statistics

from bench.rounds import in_round_order
from bench.direct import DirectModel
from tanglebox.model_location import embedded_model_path

ORDERS = ("ids", "rotated", "reversed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    path = embedded_model_path()
    model = DirectModel(path)
    rates: dict[str, list[float]] = {order: [] for order in ORDERS}
    for round_ in range(args.rounds):
        # the same prompts for every order (each run starts from an empty cache), so the
        # orders differ in nothing else
        prompts = [model.tokenize(f"Story {round_}.{i}: write a long story.")
                   for i in range(args.streams)]
        for order in in_round_order(ORDERS, round_):
            streams = model.generate(prompts, args.tokens, order=order)
            seconds = max(s.token_times[-1] for s in streams if s.token_times) - streams[0].started
            rates[order].append(sum(len(s.token_times) for s in streams) / seconds)
    model.close()
    ids = statistics.median(rates["ids"])
    print(f"machine: {platform.machine()}, Python {platform.python_version()}; model {path.name}; "
          f"{args.streams} streams x {args.tokens} tokens, greedy; {args.rounds} rounds, medians\n")
    print("| sequences in each step's batch | tokens/s (all streams) | ÷ ascending ids |")
    print("|---|---|---|")
    for order in ORDERS:
        rate = statistics.median(rates[order])
        print(f"| {order} | {rate:.1f} | {rate / ids:.2f} |")


if __name__ == "__main__":
    main()

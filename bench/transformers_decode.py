"""Decoding speed of the transformers backend: the dynamic step against the static one (and,
on cuda, the static step compiled with CUDA graphs), for 1 and 8 streams.

``python -m bench.transformers_decode [--device cpu|cuda] [--streams 1,8] [--tokens 64]
[--rounds 3] [--warmup 16] [--model PATH ...] [--no-smollm2] [--threads N]``, from the
repository root.

Models: SmolLM2-135M-Instruct from the embedded GGUF file (transformers dequantizes it at load),
and every ``--model`` (a transformers folder or a GGUF file: a ~1B model, say). Each model is
loaded once, through ``TransformersBackend.load_planned`` with the plan the server makes
(``parallelSlots`` = the most streams); each decoding kind is a backend of its own on those
weights (``dynamic``, ``static``, and on cuda ``compiled``: what ``transformersDecode: static``
picks there), so a kind keeps its compiled graphs across rounds. The static kinds step every
row of their cache (``parallelSlots`` rows) even for one stream: that is their shape.

Each round, for each stream count and each kind in turn (reversed every other round), K greedy
streams after one short chat prompt each: a warm-up of ``--warmup`` tokens (compilation and
CUDA-graph capture happen there), then ``--tokens`` tokens timed. Reported: the median
tokens/s (all streams' tokens over the time) per kind and K, and the median of the per-round
ratios to dynamic.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

KINDS = {"cpu": ("dynamic", "static"), "cuda": ("dynamic", "static", "compiled")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=tuple(KINDS))
    parser.add_argument("--streams", default="1,8")
    parser.add_argument("--tokens", type=int, default=64, help="tokens timed per stream")
    parser.add_argument("--warmup", type=int, default=16, help="tokens per stream before timing")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--context", type=int, default=1024, help="contextLength")
    parser.add_argument("--model", action="append", default=[],
                        help="a transformers folder or GGUF file (repeatable)")
    parser.add_argument("--no-smollm2", action="store_true", help="skip the embedded model")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's, one per core)")
    args = parser.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench.quantization import machine_description
    from tanglebox.model_location import embedded_model_path
    streams = [int(k) for k in args.streams.split(",")]
    paths = ([] if args.no_smollm2 else [str(embedded_model_path())]) + args.model
    print(machine_description(args.device, args.threads))
    print(f"Command: python -m bench.transformers_decode {' '.join(sys.argv[1:])}".rstrip())
    print(f"Load average (1 min) at start: {os.getloadavg()[0]:.1f}\n")
    print("| model | kind | " + " | ".join(f"{k} streams, tokens/s | x dynamic" for k in streams)
          + " |")
    print("|---|---|" + "---:|---:|" * len(streams))
    for path in paths:
        results = measure_model(path, args.device, streams, args.tokens, args.warmup,
                                args.rounds, args.context)
        for kind in KINDS[args.device]:
            cells = []
            for k in streams:
                runs = results[(kind, k)]
                ratios = [run / base for run, base in zip(runs, results[("dynamic", k)])]
                cells += [f"{statistics.median(runs):.1f}", f"{statistics.median(ratios):.2f}"]
            print(f"| {Path(path).name} | {kind} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nLoad average (1 min) at end: {os.getloadavg()[0]:.1f}; medians of {args.rounds} "
          f"rounds of {args.tokens} tokens per stream after {args.warmup} warm-up tokens")


def measure_model(path: str, device: str, streams: list[int], tokens: int, warmup: int,
                  rounds: int, context: int) -> dict[tuple[str, int], list[float]]:
    """tokens/s per (kind, K), one entry per round."""
    from bench.quantization import decode_speed
    from bench.rounds import in_round_order
    from tanglebox.backends.transformers.backend import TransformersBackend
    from tanglebox.backends.transformers.plan import DeviceInfo, loading_config
    from tanglebox.model_location import ModelLocation
    from tanglebox.settings import load_settings
    location = ModelLocation(Path(path), "transformers", path.endswith(".gguf"))
    with tempfile.TemporaryDirectory(prefix="tanglebox-decode-bench-") as scratch:
        settings_path = Path(scratch) / "settings.json"
        settings_path.write_text(json.dumps({
            "backend": "transformers", "device": device, "parallelSlots": max(streams),
            "contextLength": context, "transformersDecode": "dynamic"}))
        settings = load_settings(settings_path)
        plan = loading_config(settings, DeviceInfo.probe(), gguf=location.gguf)
        loaded = TransformersBackend.load_planned(settings, location, plan)
    backends = {kind: TransformersBackend(
        loaded.model, loaded.tokenizer, model_name=loaded.model_name, device=device,
        context_length=loaded.context_length, max_sequences=max(streams),
        batch_tokens=loaded.batch_tokens, decode=kind) for kind in KINDS[device][1:]}
    backends["dynamic"] = loaded
    results: dict[tuple[str, int], list[float]] = {}
    for round_index in range(rounds):
        for k in streams:
            for kind in in_round_order(KINDS[device], round_index):
                started = time.perf_counter()
                speed = decode_speed(backends[kind], k, tokens, warmup)
                results.setdefault((kind, k), []).append(speed)
                print(f"round {round_index + 1}: {Path(path).name} {kind} {k} streams: "
                      f"{speed:.1f} tokens/s ({time.perf_counter() - started:.1f} s with the "
                      "warm-up)", file=sys.stderr, flush=True)
    for backend in backends.values():
        backend.close()
    return results


if __name__ == "__main__":
    main()

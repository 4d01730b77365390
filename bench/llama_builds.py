"""Builds of llama.cpp side by side: the same engine on each build's libraries, in one run.

``python -m bench.llama_builds --build native=DIR --build portable=DIR [--build wheel=DIR]
[--streams 1,8] [--tokens 128] [--rounds 4]``

Each DIR holds a ``libllama.so`` (a CMake build's ``bin/``, or an installed llama-cpp-python's
``llama_cpp/lib``). Every measurement is a fresh child process that loads llama-cpp-python with
``LLAMA_CPP_LIB_PATH=DIR`` (llama-cpp-python's own switch), so the Python side is identical and
only the compiled kernels differ. A child loads the embedded model with K slots, warms up, then
times K streams of N tokens at temperature 0 through Tanglebox's Engine (``engine_batched``'s
``engine_run``): aggregate tokens/s. Within a round the builds run one after the other, in
reverse order every other round (``rounds.in_round_order``); the ratio to the first build is
taken per round and reported as the median over rounds with its range.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

from bench.rounds import in_round_order

ROOT = Path(__file__).resolve().parents[1]
CONTEXT_PER_STREAM = 1024


def cpu_description() -> str:
    """The CPU's model name and the SIMD flags that decide which kernels can run."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    simd = [f for f in ("avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512_vnni",
                        "avx512_bf16", "amx_tile", "amx_int8") if f in flags]
    return f"{model} ({os.cpu_count()} cores; {' '.join(simd) or 'no AVX'})"


def child(streams: int, tokens: int, round_: int) -> None:
    """Runs in the child: one measurement on whichever build LLAMA_CPP_LIB_PATH names."""
    import llama_cpp

    from bench.engine_batched import engine_run
    from tanglebox.backends.llama_cpp_backend import LlamaCppBackend
    from tanglebox.engine import Engine
    from tanglebox.model_location import embedded_model_path

    backend = LlamaCppBackend(embedded_model_path(), CONTEXT_PER_STREAM, streams, 0, "cpu")
    engine = Engine(backend, "auto")
    engine.start()
    try:
        engine_run(engine, streams, 0, 16)  # warm-up: page faults, allocations
        rate = engine_run(engine, streams, round_, tokens)
    finally:
        engine.stop(drain_seconds=1)
    print(json.dumps({"tokens_per_s": rate,
                      "system_info": llama_cpp.llama_print_system_info().decode()}))


def measure(lib_dir: str, streams: int, tokens: int, round_: int) -> dict:
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": lib_dir}
    result = subprocess.run([sys.executable, "-m", "bench.llama_builds", "--child",
                             str(streams), str(tokens), str(round_)],
                            cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="append", required=True, metavar="NAME=DIR",
                        help="a build: a name and the folder with its libllama.so")
    parser.add_argument("--streams", default="1,8", help="comma-separated stream counts")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args(argv)
    builds = dict(item.split("=", 1) for item in args.build)
    for name, folder in builds.items():
        if not (Path(folder) / "libllama.so").is_file():
            parser.error(f"--build {name}: no libllama.so in {folder}")
    stream_counts = [int(k) for k in args.streams.split(",")]

    rates = {(name, k): [] for name in builds for k in stream_counts}
    info: dict[str, str] = {}
    for round_ in range(1, args.rounds + 1):
        for k in stream_counts:
            for name in in_round_order(list(builds), round_ - 1):
                result = measure(builds[name], k, args.tokens, round_)
                rates[(name, k)].append(result["tokens_per_s"])
                info[name] = result["system_info"]
                print(f"round {round_}, {k} streams, {name}: {result['tokens_per_s']:.1f} "
                      "tokens/s", file=sys.stderr, flush=True)

    first = next(iter(builds))
    print(f"CPU: {cpu_description()}; Python {platform.python_version()}; embedded model; "
          f"{args.tokens} tokens per stream, temperature 0; {args.rounds} rounds, medians\n")
    for name in builds:
        print(f"- {name}: `{info[name].strip()}`")
    print(f"\n| build | streams | tokens/s (median) | ÷ {first}, per round: median (range) |")
    print("|---|---|---|---|")
    for k in stream_counts:
        for name in builds:
            ratios = [mine / theirs for mine, theirs in zip(rates[(name, k)], rates[(first, k)])]
            print(f"| {name} | {k} | {statistics.median(rates[(name, k)]):.1f} | "
                  f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}) |")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
    else:
        main()

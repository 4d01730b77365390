"""Proxy overhead: K clients through a front Tanglebox whose one model is a remote endpoint,
against the same upstream hit directly, in one run.

``python -m bench.proxy_overhead --llama-server PATH [--upstream-threads N] [--same-libs]
[--clients 1,8] [--rounds 4] [--max-tokens 128] [--surfaces openai,rest] [--json FILE]``, or
``--upstream tanglebox`` for a second Tanglebox (with the model) as the upstream; from the
repository root.

The upstream serves the embedded model (or ``--model``): llama.cpp's llama-server with
``--parallel`` = the largest K (``-c`` = K × 1024, so each slot holds 1024 tokens), or a
Tanglebox with ``parallelSlots`` = K. The front is a Tanglebox with no model of its own
(``modelName: ""``) and one entry in ``remoteEndpoints`` pointing at the upstream's ``/v1``, with
``maxConcurrent`` = K: every reply it serves is streamed from the upstream.

For each K and each round (the contestants in turns, reversed every other round, so drift on a
shared machine hits both alike; each K's turn starts with one discarded direct run, since the
first run after a change of K was slower whoever made it):

- **direct**: K clients stream ``POST /v1/chat/completions`` from the upstream itself;
- **through Tanglebox**, on each ``--surfaces`` (default ``openai``: the very same body on the
  front's ``/v1/chat/completions``; ``rest``, ``original``, ``ui`` drive its other surfaces):
  K clients through the front, which streams each reply from the upstream.

Every prompt is unique, temperature 0, tokens counted with the model's own tokenizer on the text
each client got. Reported per contestant and K as in the serving benchmark (``bench/report.py``),
with the goals of issue 16: through Tanglebox at least 0.95 of the direct tokens/s (median of the
per-round ratios) and a time to first token p50 at most 5 ms above direct's (median of the
per-round differences). Both servers share this machine's CPUs: the front's own work is taken
from the upstream's, as it would be on one box (on a GPU upstream the front costs it nothing).
The report gives the CPU model, the load average before and after, and the CPU time other
processes used during the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import requests

from bench.clients import SURFACE_NAMES, SURFACES, OpenAIChatClient
from bench.contest import Prompts, add_contest_arguments, chosen_surfaces, run_clients
from bench.direct import DirectModel, cpu_threads
from bench.machine import OtherLoad, cpu_model, load_average
from bench.report import Run, markdown_table, ms, percentile, proxy_overhead, summarize
from bench.rounds import in_round_order
from bench.servers import (ServerProcess, llama_server_libraries, start_front_tanglebox,
                           start_llama_server, start_tanglebox)

CONTEXT_LENGTH = 1024  # tokens per slot of the upstream
UPSTREAM_TIMEOUT = 300  # the front's timeoutSeconds for the upstream


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.proxy_overhead",
                                     description=__doc__.splitlines()[0])
    add_contest_arguments(parser, clients="1,8", rounds=4, surfaces="openai")
    parser.add_argument("--upstream", choices=("llama-server", "tanglebox"),
                        default="llama-server",
                        help="what serves the model behind the front (default llama-server, "
                             "which needs --llama-server)")
    parser.add_argument("--llama-server", type=Path, metavar="PATH",
                        help="llama.cpp's llama-server binary")
    parser.add_argument("--upstream-threads", type=int, metavar="N",
                        help="llama-server's -t and -tb (default: every usable CPU); fewer leave "
                             "CPU to the front on a small machine, for both contestants alike")
    parser.add_argument("--same-libs", action="store_true",
                        help="start llama-server on llama-cpp-python's libllama/libggml")
    parser.add_argument("--model", type=Path, help="GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    return parser.parse_args(argv)


def upstream_model_id(url: str) -> str:
    """The id the upstream's ``GET /v1/models`` lists first: what the front asks it for."""
    response = requests.get(url.rstrip("/") + "/v1/models", timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def start_upstream(args: argparse.Namespace, model_path: Path, slots: int, threads: int,
                   folder: Path) -> ServerProcess:
    if args.upstream == "tanglebox":
        return start_tanglebox(model_path, slots, CONTEXT_LENGTH, folder, args.max_tokens)
    return start_llama_server(args.llama_server, model_path, slots, CONTEXT_LENGTH, threads,
                              folder, args.same_libs)


def machine_lines(model_name: str, args: argparse.Namespace, loads: list[tuple],
                  other_load: float) -> list[str]:
    """The report's lines about the machine and how quiet it was."""
    before, after = (" ".join(f"{v:.2f}" for v in load) for load in loads)
    return [f"machine: {cpu_model() or platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs ({cpu_threads()} usable), Python "
            f"{platform.python_version()}; model {model_name}; {args.max_tokens} tokens per "
            f"reply at temperature 0; {args.rounds} rounds; upstream {args.upstream}"
            + (f" on {args.upstream_threads} threads" if args.upstream_threads else ""),
            f"load average (1, 5, 15 min) before the rounds {before}, after {after}; other "
            f"processes used {100 * other_load:.0f} % of the CPU time during the rounds"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.upstream == "llama-server" and not args.llama_server:
        print("bench.proxy_overhead: --llama-server PATH is needed (or --upstream tanglebox)",
              file=sys.stderr)
        return 2
    try:
        surfaces = chosen_surfaces(args.surfaces)
    except ValueError as err:
        print(f"bench.proxy_overhead: {err}", file=sys.stderr)
        return 2
    from tanglebox.model_location import embedded_model_path

    model_path = (args.model or embedded_model_path()).resolve()
    ks = [int(k) for k in args.clients.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="tanglebox-proxy-bench-"))
    tokenizer = DirectModel(model_path)  # counts the tokens of every reply, the same way
    prompts = Prompts()
    direct_name = f"{args.upstream} direct"
    servers: list[ServerProcess] = []
    runs: dict[tuple[str, int], list[Run]] = {}
    libraries = ""
    try:
        upstream = start_upstream(args, model_path, max(ks),
                                  args.upstream_threads or tokenizer.threads, folder)
        servers.append(upstream)
        if args.upstream == "llama-server":
            libraries = llama_server_libraries(upstream)
        front = start_front_tanglebox(upstream.url + "/v1", upstream_model_id(upstream.url),
                                      max(ks), UPSTREAM_TIMEOUT, folder, args.max_tokens)
        servers.append(front)
        contestants = {direct_name: lambda: OpenAIChatClient(upstream.url, args.max_tokens)}
        for surface in surfaces:
            contestants[f"Tanglebox {SURFACE_NAMES[surface]} → {args.upstream}"] = (
                lambda s=surface: SURFACES[s](front.url, front.ws_url, args.max_tokens))

        def measure(name: str, k: int) -> Run:
            return run_clients(name, contestants[name], prompts.take(k),
                               tokenizer.count_tokens, [])

        for k in ks:  # warm-up: first requests pay for page faults and connections
            for name in contestants:
                measure(name, k)
        loads = [load_average()]
        meter = OtherLoad([os.getpid()] + [server.pid() for server in servers])
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}", file=sys.stderr, flush=True)
            for k in ks:
                # Whoever comes first after the K of the previous phase pays for the upstream
                # settling into the new load (seen as +50-60 ms TTFT on a quiet machine, on
                # every contestant alike): one discarded direct run takes that cost.
                measure(direct_name, k)
                for name in in_round_order(list(contestants), round_):
                    run = measure(name, k)
                    runs.setdefault((name, k), []).append(run)
                    print(f"  {name:<44} K={k}: "
                          f"{run.tokens / run.seconds if run.seconds else 0:6.1f} tokens/s, "
                          f"TTFT p50 {ms(percentile(run.ttft, 50))} ms"
                          + (f", errors: {run.errors[:3]}" if run.errors else ""),
                          file=sys.stderr, flush=True)
        other_load = meter.fraction()
        loads.append(load_average())
    finally:
        for server in reversed(servers):
            server.stop()
        tokenizer.close()
    rows = [summarize(group) for group in runs.values()]
    for line in machine_lines(model_path.name, args, loads, other_load) + [libraries]:
        if line:
            print(line)
    print()
    print(markdown_table(rows))
    print()
    by = {(row.contestant, row.clients): row for row in rows}
    for row in rows:
        direct = by.get((direct_name, row.clients))
        if row.contestant != direct_name and direct:
            for line in proxy_overhead(row, direct):
                print(f"- {line}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

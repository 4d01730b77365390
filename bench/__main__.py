"""Serving benchmark: K concurrent streaming clients on every surface, against the yardsticks.

``python -m bench [--clients 1,4,8] [--rounds 3] [--max-tokens 128]
[--surfaces original,rest,ui,openai] [--url URL] [--llama-server PATH [--same-libs]
[--llama-server-api completion|chat]] [--no-direct] [--json FILE]``, from the repository
root (``pip install -r requirements-dev.txt`` first)

In one invocation, for each K and each round (interleaved, so drift on a shared machine hits
every contestant alike; every other round runs them in reverse order, so a slow trend favours
none):

- **direct**: llama-cpp-python's low-level batch API in this process (``bench/direct.py``):
  K sequences prefilled together, then one ``llama_decode`` per step, greedy;
- **Tanglebox**, over each surface: K clients (threads), each on its own connection, send their
  prompt at the same moment and stream the reply; meanwhile ``/health`` and a ``#-ping-#`` on
  another, idle, original socket are probed (every ``--probe-interval`` seconds);
- **llama-server** (``--llama-server PATH``): llama.cpp's C++ server with the same model, ``-np K``
  and the same threads, streamed: on ``/completion`` with the prompt rendered here, or with
  ``--llama-server-api chat`` on ``/v1/chat/completions`` with the very body Tanglebox's
  ``openai`` surface gets (each server applies the model's chat template itself; the report
  says whether the two render the same prompt). Built from llama-cpp-python's vendored
  llama.cpp with the same portable flags (docs/benchmarks.md), or run with ``--same-libs`` on
  llama-cpp-python's libllama/libggml, it runs the same kernels as Tanglebox; the report says
  which libraries it loaded.

Every request is unique (a numbered prompt), so no contestant answers from a cached prompt.
Temperature 0. Tokens are counted with the model's own tokenizer on the text each client got.
Tanglebox is started with ``parallelSlots`` = the largest K unless ``--url`` names a running
server (then the server's own settings apply; it must allow ``--max-tokens``).

Reported (``bench/report.py``) per contestant and K: time to first token p50/p95 (from the
prompt being sent to the first chunk), inter-token latency p50/p95 (per reply: first to last
chunk over its tokens - 1), aggregate tokens/s (all tokens / wall time from the first send to
the last token), and the p99 of the ``/health`` and ping probes while the K streams run (each
probe every ``--probe-interval`` seconds, so they measure the web side without loading it
much). Against llama-server, at every K, the goal line gives the median of the per-round
ratios (both measured in the same round).
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

from bench import clients as bench_clients
from bench.clients import SURFACE_NAMES, SURFACES
from bench.contest import Prompts, add_contest_arguments, chosen_surfaces, run_clients
from bench.direct import DirectModel, cpu_threads
from bench.machine import OtherLoad
from bench.report import Run, goals, markdown_table, ms, percentile, summarize
from bench.rounds import in_round_order
from bench.servers import llama_server_libraries, start_llama_server, start_tanglebox

CONTEXT_LENGTH = 1024


# -- contestants -------------------------------------------------------------------------------

def run_direct(model: DirectModel, render, prompts: list[str], max_tokens: int) -> Run:
    run = Run("llama-cpp-python direct", len(prompts))
    streams = model.generate([model.tokenize(render(p)) for p in prompts], max_tokens,
                             context_per_stream=CONTEXT_LENGTH)
    started = streams[0].started
    last = started
    for stream in streams:
        times = stream.token_times
        if not times:
            run.errors.append("no tokens")
            continue
        run.ttft.append(times[0] - started)
        count = model.count_tokens(stream.text)
        run.tokens += count
        if count > 1:
            run.itl.append((times[-1] - times[0]) / (count - 1))
        last = max(last, times[-1])
    run.seconds = last - started
    return run


# -- main --------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench",
                                     description=__doc__.splitlines()[0])
    add_contest_arguments(parser, clients="1,4,8", rounds=3, surfaces="original,rest,ui")
    parser.add_argument("--url", help="a running Tanglebox server (default: start one)")
    parser.add_argument("--model", type=Path, help="GGUF file (default: the embedded SmolLM2)")
    parser.add_argument("--llama-server", type=Path, metavar="PATH",
                        help="llama.cpp's llama-server binary, to run with the same model")
    parser.add_argument("--llama-server-api", choices=sorted(LLAMA_SERVER_APIS),
                        default="completion",
                        help="llama-server's endpoint: completion (/completion, the prompt "
                             "rendered here) or chat (/v1/chat/completions, as the openai "
                             "surface); default completion")
    parser.add_argument("--same-libs", action="store_true",
                        help="start llama-server with LD_LIBRARY_PATH at llama-cpp-python's "
                             "llama_cpp/lib: the very libllama/libggml Tanglebox calls")
    parser.add_argument("--no-direct", action="store_true",
                        help="skip the llama-cpp-python direct runs")
    parser.add_argument("--probe-interval", type=float, default=0.2, metavar="SECONDS",
                        help="pause between two /health (and two ping) probes while streams run; "
                             "each probe is work the server does beside the streams (default 0.2)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the rows as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from tanglebox.model_location import embedded_model_path
    from tanglebox.prompting import USER, Message, render_prompt

    model_path = (args.model or embedded_model_path()).resolve()
    ks = [int(k) for k in args.clients.split(",")]
    try:
        surfaces = chosen_surfaces(args.surfaces)
    except ValueError as err:
        print(f"bench: {err}", file=sys.stderr)
        return 2
    folder = Path(tempfile.mkdtemp(prefix="tanglebox-bench-"))
    model = DirectModel(model_path)
    chat_format = model.chat_format()

    def render(prompt: str) -> str:
        return render_prompt("auto", [Message(USER, prompt)], "", chat_format).text

    prompts = Prompts()
    servers = []
    libraries = prompt_check = ""
    try:
        if args.url:
            url = args.url.rstrip("/")
            ws_url = "ws" + url[4:]
        else:
            tanglebox = start_tanglebox(model_path, max(ks), CONTEXT_LENGTH, folder,
                                        args.max_tokens)
            servers.append(tanglebox)
            url, ws_url = tanglebox.url, tanglebox.ws_url
        llama_servers = {}
        if args.llama_server:
            for k in ks:
                llama_servers[k] = start_llama_server(args.llama_server, model_path, k,
                                                      CONTEXT_LENGTH, model.threads, folder,
                                                      args.same_libs)
                servers.append(llama_servers[k])
            libraries = llama_server_libraries(llama_servers[ks[0]])
            print(libraries, file=sys.stderr, flush=True)
            if args.llama_server_api == "chat":
                prompt_check = bench_clients.chat_prompt_check(
                    url, llama_servers[ks[0]].url, prompts.take(1)[0], render)
                print(prompt_check, file=sys.stderr, flush=True)
        runs: dict[tuple[str, int], list[Run]] = {}

        def record(run: Run) -> None:
            runs.setdefault((run.contestant, run.clients), []).append(run)
            print(f"  {run.contestant:<28} K={run.clients}: "
                  f"{run.tokens / run.seconds if run.seconds else 0:6.1f} tokens/s, "
                  f"TTFT p50 {ms(percentile(run.ttft, 50))} ms"
                  + (f", errors: {run.errors[:3]}" if run.errors else ""),
                  file=sys.stderr, flush=True)

        for k in ks:  # warm-up: first requests pay for page faults and allocations
            for surface in surfaces:
                run_clients("warm-up", lambda s=surface: SURFACES[s](url, ws_url,
                                                                     args.max_tokens),
                            prompts.take(k), model.count_tokens, [])
            if k in llama_servers:
                run_clients("warm-up", lambda s=llama_servers[k]: llama_server_client(
                    args.llama_server_api, s.url, args.max_tokens, render),
                    prompts.take(k), model.count_tokens, [])
        meter = OtherLoad([os.getpid()] + [server.pid() for server in servers])
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}", file=sys.stderr, flush=True)
            for k in ks:
                contestants = []
                if not args.no_direct:
                    contestants.append(lambda k=k: run_direct(model, render, prompts.take(k),
                                                              args.max_tokens))
                for surface in surfaces:
                    contestants.append(lambda k=k, surface=surface: run_clients(
                        f"Tanglebox {SURFACE_NAMES[surface]}",
                        lambda: SURFACES[surface](url, ws_url, args.max_tokens),
                        prompts.take(k), model.count_tokens,
                        [bench_clients.health_probe(url, args.probe_interval),
                         bench_clients.ping_probe(ws_url, args.probe_interval)]))
                if k in llama_servers:
                    server = llama_servers[k]
                    contestants.append(lambda k=k, server=server: run_clients(
                        LLAMA_SERVER_APIS[args.llama_server_api], lambda: llama_server_client(
                            args.llama_server_api, server.url, args.max_tokens, render),
                        prompts.take(k), model.count_tokens,
                        [bench_clients.health_probe(server.url, args.probe_interval)]))
                for contestant in in_round_order(contestants, round_):
                    record(contestant())
        other_load = meter.fraction()
    finally:
        for server in servers:
            server.stop()
    rows = [summarize(group) for group in runs.values()]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({cpu_threads()} usable), "
          f"Python {platform.python_version()}; model {model_path.name}; "
          f"{args.max_tokens} tokens per reply at temperature 0; {args.rounds} rounds")
    print(f"other processes on this machine used {100 * other_load:.0f} % of its CPU time "
          "during the measured rounds" + (" (the --url server counts as other)" if args.url
                                          else ""))
    for line in (libraries, prompt_check):
        if line:
            print(line)
    print()
    print(markdown_table(rows))
    print()
    for line in goals(rows, max(ks)):
        print(f"- {line}")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2), encoding="utf-8")
    model.close()
    return 0


# llama-server's contestant name for each of its endpoints the benchmark can drive
LLAMA_SERVER_APIS = {"completion": "llama-server", "chat": "llama-server OpenAI chat stream"}


def llama_server_client(api: str, url: str, max_tokens: int, render):
    if api == "chat":
        return bench_clients.OpenAIChatClient(url, max_tokens)
    return bench_clients.LlamaServerClient(url, max_tokens, render)

if __name__ == "__main__":
    sys.exit(main())

"""The web side's CPU: what each surface's work costs the worker's main thread, side by side.

``python -m bench.web_cpu [--checkouts PATH,PATH] [--surfaces original,ui] [--clients 8]
[--rounds 4] [--max-tokens 128] [--fake STEP_DELAY --prompt "count 300"]``, from the
repository root.

On a CPU server the model takes every core, so what the web side spends (rendering, storing,
socket writes) is taken from the tokens; the serving benchmark's rates swing too much on a
shared machine to show a few per cent of a core. This counts it directly: one Tanglebox per
checkout (``--checkouts``, default this one: compare a change with the commit before it from a
``git worktree``), K clients streaming on each surface, rounds alternating, and for each round
the CPU seconds of the worker's main thread (gevent runs every request and socket there; the
engine and llama.cpp run on other threads) during the timed part only, read from ``/proc``.

``--fake STEP_DELAY`` serves ``tests.fake_backend`` instead of the model (``tests.fake_server``:
one byte a token, STEP_DELAY seconds a decode, no CPU of its own), so the web side is all that
runs: per-token costs show undiluted. Its replies follow the fake's rules (``--prompt "count
300"``: the numbers 1 to 300).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.clients import SURFACES
from bench.contest import Prompts, add_contest_arguments, chosen_surfaces, run_clients
from bench.direct import DirectModel
from bench.machine import cpu_model, main_thread_cpu_seconds
from bench.servers import ROOT, ServerProcess, start_tanglebox_with

CONTEXT_LENGTH = 2048


class WebThreadMeter:
    """A probe for ``run_clients``: started when the clients send, stopped when the last
    reply ended; ``seconds`` is the worker's main-thread CPU in between."""

    errors = 0

    def __init__(self, pid: int) -> None:
        self.pid, self.seconds, self._start = pid, 0.0, 0.0

    def start(self) -> "WebThreadMeter":
        self._start = main_thread_cpu_seconds(self.pid)
        return self

    def stop(self) -> list[float]:
        self.seconds = main_thread_cpu_seconds(self.pid) - self._start
        return []


def start_server(checkout: Path, model: Path, clients: int, folder: Path, index: int,
                 fake_step: float | None) -> ServerProcess:
    settings = {"modelName": str(model), "parallelSlots": clients,
                "contextLength": CONTEXT_LENGTH, "queueSize": 4 * clients,
                "maxNewTokensLimit": 4096,
                "databaseUrl": f"sqlite:///{folder}/conversations-{index}.db"}
    fake = None if fake_step is None else {"max_sequences": clients, "step_delay": fake_step}
    return start_tanglebox_with(settings, folder, f"tanglebox-{index}", checkout, fake)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.web_cpu", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--checkouts", default=str(ROOT),
                        help="comma-separated repository folders, one server each")
    parser.add_argument("--fake", type=float, metavar="STEP_DELAY",
                        help="serve tests.fake_backend with this delay per decode")
    parser.add_argument("--prompt", help="every client's prompt (default: a numbered story)")
    add_contest_arguments(parser, clients="8", rounds=4, surfaces="original,ui")
    args = parser.parse_args(argv)
    surfaces = chosen_surfaces(args.surfaces)
    clients = int(args.clients.split(",")[-1])
    checkouts = [Path(c).resolve() for c in args.checkouts.split(",")]
    from tanglebox.model_location import embedded_model_path
    model_path = embedded_model_path()
    model = DirectModel(model_path)
    prompts = Prompts()
    take = (lambda k: [args.prompt] * k) if args.prompt else prompts.take
    results: dict[tuple[int, str], list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        servers = [start_server(c, model_path, clients, Path(scratch), i, args.fake)
                   for i, c in enumerate(checkouts)]
        try:
            for server in servers:  # warm-up: page faults, templates, statement caches
                for surface in surfaces:
                    run_clients("warm-up", lambda s=surface, v=server: SURFACES[s](
                        v.url, v.ws_url, args.max_tokens), take(clients), model.count_tokens, [])
            for round_ in range(args.rounds):
                order = range(len(servers)) if round_ % 2 == 0 else reversed(range(len(servers)))
                for index in order:
                    server = servers[index]
                    for surface in surfaces:
                        meter = WebThreadMeter(server.pid())
                        run = run_clients(surface, lambda s=surface, v=server: SURFACES[s](
                            v.url, v.ws_url, args.max_tokens), take(clients),
                            model.count_tokens, [meter])
                        rate = run.tokens / run.seconds if run.seconds else 0.0
                        results.setdefault((index, surface), []).append((meter.seconds, rate))
                        print(f"round {round_ + 1}: {checkouts[index].name} {surface}: web "
                              f"thread {meter.seconds:.2f} s, {rate:.1f} tokens/s, "
                              f"{run.tokens} tokens" + (f", errors {run.errors[:2]}"
                                                        if run.errors else ""),
                              file=sys.stderr, flush=True)
        finally:
            for server in servers:
                server.stop()
    served = model_path.name if args.fake is None else f"fake backend, {args.fake} s a step"
    print(f"CPU {cpu_model()}; {clients} clients × {args.max_tokens} tokens; {served}; "
          f"{args.rounds} rounds\n")
    print("| checkout | surface | web thread CPU s/round (median, range) | tokens/s (median) |")
    print("|---|---|---|---|")
    for (index, surface), values in sorted(results.items()):
        cpu = [v[0] for v in values]
        rate = statistics.median(v[1] for v in values)
        print(f"| {checkouts[index]} | {surface} | {statistics.median(cpu):.2f} "
              f"({min(cpu):.2f}–{max(cpu):.2f}) | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

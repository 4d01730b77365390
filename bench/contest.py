"""One measurement of a benchmark that drives servers: K clients send at the same moment.

``run_clients`` starts K clients (threads, each on its own connection, connected before the
clock starts), lets them send their prompts together and stream the replies, runs the probes
beside them, and turns what the clients saw into a ``Run`` (time to first token, inter-token
latency, tokens over the wall time from the first send to the last token). ``Prompts`` numbers
every prompt, so no server answers one from a cached prompt.
"""

from __future__ import annotations

import argparse
import threading

from bench import clients as bench_clients
from bench.clients import SURFACES
from bench.report import Run

TOPICS = ("a dragon who learns to bake bread", "a lighthouse keeper and a storm",
          "a robot that wants to paint", "a city under the sea", "a forest that sings",
          "a clockmaker's last clock", "a ship lost in the fog", "a library on the moon")


class Prompts:
    """Numbered, so every request in the whole benchmark is a different prompt."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    def take(self, k: int) -> list[str]:
        with self._lock:
            start, self._count = self._count, self._count + k
        return [f"Story {start + i}: write a long story about {TOPICS[(start + i) % len(TOPICS)]}."
                for i in range(k)]


def run_clients(contestant: str, make_client, prompts: list[str], count_tokens,
                probes: list[bench_clients.Probe]) -> Run:
    """K clients send at the same moment; probes run while they stream."""
    run = Run(contestant, len(prompts))
    clients = [make_client() for _ in prompts]
    for client in clients:
        client.prepare()
    replies: list[bench_clients.Reply | None] = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts) + 1)

    def talk(index: int) -> None:
        barrier.wait()
        try:
            replies[index] = clients[index].send(prompts[index])
        except Exception as err:  # noqa: BLE001 - a failed client is reported, not fatal
            replies[index] = bench_clients.Reply(error=f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=talk, args=(i,), daemon=True) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for probe in probes:
        probe.start()
    barrier.wait()
    for thread in threads:
        thread.join(bench_clients.REPLY_TIMEOUT)
    for probe in probes:
        latencies = probe.stop()
        if probe is probes[0]:
            run.health = latencies
        else:
            run.ping = latencies
        if probe.errors:
            run.errors.append(f"{probe.errors} probe errors")
    for client in clients:
        client.close()
    sent = [r.sent_at for r in replies if r and r.sent_at]
    ends = []
    for reply in replies:
        if reply is None or reply.error or not reply.chunk_times:
            run.errors.append(reply.error if reply and reply.error else "no reply")
            continue
        run.ttft.append(reply.chunk_times[0] - reply.sent_at)
        count = reply.tokens if reply.tokens is not None else count_tokens(reply.text)
        run.tokens += count
        if count > 1:
            run.itl.append((reply.chunk_times[-1] - reply.chunk_times[0]) / (count - 1))
        ends.append(reply.chunk_times[-1])
    run.seconds = (max(ends) - min(sent)) if ends else float("nan")
    return run


def add_contest_arguments(parser: argparse.ArgumentParser, clients: str, rounds: int,
                          surfaces: str) -> None:
    """The options every benchmark of K streaming clients takes, with its own defaults."""
    parser.add_argument("--clients", default=clients,
                        help=f"comma-separated numbers of concurrent clients (default {clients})")
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="repetitions of each measurement")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per reply")
    parser.add_argument("--surfaces", default=surfaces,
                        help=f"Tanglebox surfaces to drive: {', '.join(SURFACES)} "
                             f"(default {surfaces})")


def chosen_surfaces(text: str) -> list[str]:
    """The surfaces named in ``--surfaces``; ValueError names any that does not exist."""
    surfaces = [s.strip() for s in text.split(",") if s.strip()]
    unknown = set(surfaces) - set(SURFACES)
    if unknown:
        raise ValueError(f"unknown surface {', '.join(sorted(unknown))}; choose from "
                         f"{', '.join(SURFACES)}")
    return surfaces

"""Soak: many clients on every surface for minutes, some of them careless or abusive.

``python -m bench.soak [--minutes 30] [--clients 8] [--slots 4] [--tokens 64]``

Starts Tanglebox on the embedded model (``servers.start_tanglebox``: a free loopback port, its
own folder) and runs, until the time is up:

- ``--clients`` honest clients, each in a loop over the three surfaces (original socket, REST
  streamed, UI socket). Per request, 10 % hang up after the first chunk of the reply, and 5 %
  send something invalid, whose refusal is the expected answer. A full queue (503 +
  Retry-After, or the socket's busy message) is counted as "busy", and the client waits the
  Retry-After (at most 2 s) before its next request.
- one slow client: a streamed REST reply read one chunk a second;
- one flooding client: ``#-ping-#`` on the original socket as fast as it can, never reading
  (bounded: 100,000 messages), until the server stops it.

Every 10 s it samples the worker's resident memory (``/proc``) and ``/health``. At the end it
waits (up to 60 s) for every slot to be free: a slot still busy then is stuck. It prints a
Markdown report: replies by surface, expected refusals, unexpected errors (anything else: a
5xx, a reset the client did not cause, a socket error message that was not asked for), time to
first token p50/p99, the memory samples, stuck slots, and what happened to the flood.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import websocket

from bench.clients import REPLY_WITH_TEXT, _composer_enabled, _element_text
from bench.servers import ServerProcess, start_tanglebox
from tanglebox.model_location import embedded_model_path

HANG_UP_SHARE = 0.10
INVALID_SHARE = 0.05
SAMPLE_SECONDS = 10.0
FLOOD_MESSAGES = 100_000
IDLE_DEADLINE_SECONDS = 60.0
REPLY_TIMEOUT = 300.0
TOPICS = ("the sea", "a lighthouse", "a robot", "a forest", "a city", "a clock", "a ship")


class Tally:
    """Thread-safe counters and time-to-first-token samples."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: collections.Counter[str] = collections.Counter()
        self.unexpected: collections.Counter[str] = collections.Counter()
        self.first_token: list[float] = []

    def count(self, what: str) -> None:
        with self.lock:
            self.counts[what] += 1

    def fail(self, what: str) -> None:
        with self.lock:
            self.unexpected[what[:160]] += 1

    def ttft(self, seconds: float) -> None:
        with self.lock:
            self.first_token.append(seconds)


def honest_client(server: ServerProcess, index: int, tokens: int, until: float,
                  tally: Tally) -> None:
    rng = random.Random(index)
    surfaces = (original_socket_request, rest_request, ui_socket_request)
    turn = 0
    while time.monotonic() < until:
        surface = surfaces[(index + turn) % len(surfaces)]
        turn += 1
        roll = rng.random()
        mode = "invalid" if roll < INVALID_SHARE else (
            "hang up" if roll < INVALID_SHARE + HANG_UP_SHARE else "whole")
        prompt = f"Write two sentences about {TOPICS[(index + turn) % len(TOPICS)]}."
        try:
            wait = surface(server, prompt, tokens, mode, tally)
        except (OSError, websocket.WebSocketException, requests.RequestException) as err:
            tally.fail(f"{surface.__name__}: {type(err).__name__}: {err}")
            wait = 1.0
        if wait:
            time.sleep(min(wait, 2.0))  # the server's Retry-After, capped


def original_socket_request(server: ServerProcess, prompt: str, tokens: int, mode: str,
                            tally: Tally) -> float:
    ws = websocket.create_connection(server.ws_url + "/", timeout=REPLY_TIMEOUT)
    try:
        if mode == "invalid":
            ws.send("#-set-max-tokens-#lots")
            answer = ws.recv()
            expected = answer.startswith("Error:") or "maxNewTokens" in answer
            tally.count("original: invalid refused") if expected else tally.fail(
                f"original: invalid answered {answer[:80]!r}")
            return 0.0
        for setting in ("#-set-temp-#0.7", f"#-set-max-tokens-#{tokens}"):
            ws.send(setting)
            ws.recv()
        sent = time.monotonic()
        ws.send(prompt)
        if ws.recv() != "#a-c-k#":
            tally.fail("original: no #a-c-k#")
            return 0.0
        first = True
        while True:
            message = ws.recv()
            if message == "#f-i-n#":
                break
            if message.startswith("Error:"):
                if "busy" in message:
                    tally.count("original: busy")
                    return 1.0
                tally.fail(f"original: {message[:120]}")
                continue
            if first:
                tally.ttft(time.monotonic() - sent)
                first = False
                if mode == "hang up":
                    tally.count("original: hung up mid-reply")
                    return 0.0
        tally.count("original: reply")
        return 0.0
    finally:
        ws.close()


def rest_request(server: ServerProcess, prompt: str, tokens: int, mode: str,
                 tally: Tally, seconds_per_chunk: float = 0.0) -> float:
    body = {"userPrompt": prompt, "temperature": 0.7, "maxNewTokens": tokens,
            "shouldStreamResponse": True}
    if mode == "invalid":
        body["maxNewTokens"] = "lots"
    sent = time.monotonic()
    with requests.post(server.url + "/conversation", json=body, stream=True,
                       timeout=REPLY_TIMEOUT) as response:
        if mode == "invalid":
            tally.count("REST: invalid refused") if response.status_code == 400 else tally.fail(
                f"REST: invalid answered {response.status_code}")
            return 0.0
        if response.status_code == 503:
            tally.count("REST: busy")
            return float(response.headers.get("Retry-After", 1))
        if response.status_code != 200:
            tally.fail(f"REST: HTTP {response.status_code}: {response.text[:100]}")
            return 0.0
        first = True
        for chunk in response.iter_content(chunk_size=None):
            if chunk and first:
                tally.ttft(time.monotonic() - sent)
                first = False
                if mode == "hang up":
                    tally.count("REST: hung up mid-reply")
                    return 0.0
            if seconds_per_chunk:
                time.sleep(seconds_per_chunk)  # the slow reader, on purpose
    tally.count("REST: slow reader's reply" if seconds_per_chunk else "REST: reply")
    return 0.0


def ui_socket_request(server: ServerProcess, prompt: str, tokens: int, mode: str,
                      tally: Tally) -> float:
    ws = websocket.create_connection(server.ws_url + "/ws/chat?surface=page",
                                     timeout=REPLY_TIMEOUT)
    try:
        ws.recv()  # the sync
        send = lambda **values: ws.send(json.dumps({**values, "HEADERS": {}}))  # noqa: E731
        send(action="settings", temperature="0.7", maxNewTokens=str(tokens), systemPrompt="")
        ws.recv()
        sent = time.monotonic()
        send(userPrompt="   " if mode == "invalid" else prompt)
        first = True
        while True:
            fragment = ws.recv()
            error = _element_text(fragment, "chat-error")
            if error:
                if mode == "invalid":
                    tally.count("UI: invalid refused")
                    return 0.0
                if "busy" in error:
                    tally.count("UI: busy")
                    return 1.0
                tally.fail(f"UI: {error[:120]}")
            if first and REPLY_WITH_TEXT.match(fragment):
                tally.ttft(time.monotonic() - sent)
                first = False
                if mode == "hang up":
                    tally.count("UI: hung up mid-reply")
                    return 0.0
            if _composer_enabled(fragment):
                break
        if mode == "invalid":
            tally.fail("UI: an empty prompt was not refused")
        else:
            tally.count("UI: reply")
        return 0.0
    finally:
        ws.close()


def slow_client(server: ServerProcess, tokens: int, until: float, tally: Tally) -> None:
    while time.monotonic() < until:
        try:
            rest_request(server, "Count slowly from one to twenty.", tokens, "whole", tally,
                         seconds_per_chunk=1.0)
        except requests.RequestException as err:
            tally.fail(f"slow reader: {type(err).__name__}: {err}")


def flooding_client(server: ServerProcess, outcome: dict) -> None:
    ws = websocket.create_connection(server.ws_url + "/", timeout=30)
    sent = 0
    try:
        for sent in range(1, FLOOD_MESSAGES + 1):
            ws.send("#-ping-#" + "x" * 1024)
        outcome["result"] = f"sent all {FLOOD_MESSAGES} messages; the socket stayed open"
    except (OSError, websocket.WebSocketException) as err:
        outcome["result"] = f"stopped by the server after {sent} messages ({type(err).__name__})"
    finally:
        ws.close()


def worker_rss_mb(server: ServerProcess) -> float:
    """The resident memory of the master's children (the worker), in MB."""
    pid = server.pid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as children:
            pids = children.read().split()
        total = 0
        for child in pids:
            with open(f"/proc/{child}/status", encoding="ascii") as status:
                total += next(int(line.split()[1]) for line in status
                              if line.startswith("VmRSS:"))
        return total / 1024
    except (OSError, StopIteration):
        return float("nan")


def health(server: ServerProcess) -> dict:
    started = time.monotonic()
    try:
        body = requests.get(server.url + "/health", timeout=10).json()
    except (requests.RequestException, ValueError) as err:
        return {"error": type(err).__name__, "ms": (time.monotonic() - started) * 1000}
    return {**body, "ms": (time.monotonic() - started) * 1000}


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args(argv)

    folder = Path(tempfile.mkdtemp(prefix="tanglebox-soak-"))
    server = start_tanglebox(embedded_model_path(), args.slots, 2048, folder, args.tokens)
    tally, flood = Tally(), {}
    samples: list[tuple[float, float, dict]] = []
    started = time.monotonic()
    until = started + args.minutes * 60
    threads = [threading.Thread(target=honest_client, args=(server, i, args.tokens, until, tally))
               for i in range(args.clients)]
    threads.append(threading.Thread(target=slow_client, args=(server, args.tokens, until, tally)))
    threads.append(threading.Thread(target=flooding_client, args=(server, flood), daemon=True))
    samples.append((0.0, worker_rss_mb(server), health(server)))
    try:
        for thread in threads:
            thread.start()
        while time.monotonic() < until:
            time.sleep(SAMPLE_SECONDS)  # the sampling interval
            samples.append((time.monotonic() - started, worker_rss_mb(server), health(server)))
        for thread in threads[:-1]:
            thread.join(REPLY_TIMEOUT)
        deadline = time.monotonic() + IDLE_DEADLINE_SECONDS
        final = health(server)
        while (final.get("busy") or final.get("waiting")) and time.monotonic() < deadline:
            time.sleep(0.5)  # polling for the engine to settle
            final = health(server)
        samples.append((time.monotonic() - started, worker_rss_mb(server), final))
    finally:
        server.stop()
    report(args, tally, flood, samples, final, folder)


def report(args, tally: Tally, flood: dict, samples, final: dict, folder: Path) -> None:
    rss = [mb for _, mb, _ in samples]
    health_ms = [h.get("ms", float("nan")) for _, _, h in samples]
    print(f"Soak: {args.minutes:g} min, {args.clients} honest clients + 1 slow reader + 1 flooder; "
          f"{args.slots} slots, {args.tokens} tokens per reply; {platform.machine()}, Python "
          f"{platform.python_version()}; server log {folder}\n")
    print("| what | count |\n|---|---|")
    for what, count in sorted(tally.counts.items()):
        print(f"| {what} | {count} |")
    print(f"| unexpected errors | {sum(tally.unexpected.values())} |\n")
    for what, count in tally.unexpected.most_common(10):
        print(f"- unexpected ({count}x): {what}")
    ttft = tally.first_token
    print(f"\nTime to first token: p50 {statistics.median(ttft) if ttft else float('nan'):.2f} s, "
          f"p99 {percentile(ttft, 0.99):.2f} s over {len(ttft)} replies")
    print(f"/health: max {max(health_ms):.0f} ms over {len(samples)} samples")
    print(f"Worker RSS (MB): start {rss[0]:.0f}, min {min(rss):.0f}, max {max(rss):.0f}, "
          f"end {rss[-1]:.0f}; after the warm-up sample {rss[1] if len(rss) > 1 else rss[0]:.0f}")
    print(f"Flooding client: {flood.get('result', 'still sending at the end')}")
    print(f"Stuck slots at the end: {final.get('busy', '?')} busy, "
          f"{final.get('waiting', '?')} waiting")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The chat UI socket's cost per reply: block deltas against the whole reply re-rendered.

``python -m bench.ui_deltas [--tokens 2000] [--rates 20,50,100] [--rounds 3]``

One long Markdown reply (headings, paragraphs, lists, code blocks, tables, quotes; cut to
``--tokens`` word-piece tokens of about 4 characters) is streamed through the real UI socket
code (``ChatSocket.send_prompt``, its pacing and its fragments, driven in-process with a socket
that only counts what is sent) from a scripted generation, at each token rate in ``--rates``.
Time is virtual: each token advances the socket's clock by ``1 / rate`` on top of the real time
spent, so a 2,000-token reply at 20 tokens/s takes no 100 s, and the pacing sees the same
intervals it would live. Two ways, side by side in each round:

- ``deltas``: what the socket does (``ui_fragments.StreamedReply``): finished blocks once, the
  open tail again;
- ``whole``: main's way before it (:class:`WholeReply`): the whole reply rendered again and sent
  as the article at every update, and once more at the end.

Reported, medians over the rounds: bytes sent per reply (the reply's fragments, and everything
the socket sent for the turn: the composer twice, the person's message), the ratio of the
reply's bytes to the final reply's HTML (the goal: at most 2), the number of updates, and
server CPU per token (``time.process_time`` over the turn, this process only). What the socket
sends is also counted as it goes on the wire to a browser: every browser offers
permessage-deflate and the server (simple-websocket on wsproto) accepts it with the compressor's
window kept between messages (context takeover), so each frame is compressed against the last
32 kB sent and the open block sent again costs a few bytes of back-references
(:class:`BrowserWire`: wsproto's own frames, read back by a client as a check). ``--streams 8``
counts 8 replies as streaming for ``RenderPacer`` (the pacing 8 clients get; the CPU each takes
from the others is the serving benchmark's to measure).
"""

from __future__ import annotations

import argparse
import itertools
import random
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Message, Request, TextMessage
from wsproto.extensions import PerMessageDeflate

from bench.llama_builds import cpu_description
from tanglebox.generation import Delta, Done, FinishReason
from tanglebox.markdown_render import render_markdown
from tanglebox.runtime import Runtime
from tanglebox.settings import load_settings
from tanglebox.reply_runs import ReplyRun
from tanglebox.web import create_app, ui_reply_watch, ui_socket
from tanglebox.web.ui_conversation import PAGE, Turn, new_conversation
from tanglebox.web.ui_fragments import ReplyFragments, StreamedReply, reply_fragment

# Word pieces of at most 6 letters, numbers of up to 3 digits, single punctuation marks and
# runs of whitespace: about what a BPE tokenizer makes of English prose and code.
TOKEN = re.compile(r" ?[A-Za-z]{1,6}| ?[0-9]{1,3}| ?[^\sA-Za-z0-9]|\s+")

SECTION = """## Part {n}: reading and writing files

Python's standard library covers most file formats you will meet. This part shows how to
read a file line by line, how to parse {n} kinds of structured data, and what to watch for
when files are large or come from people you do not know.

1. Open the file with a `with` block, so it is closed even when an error happens.
2. Pass `encoding="utf-8"` explicitly: the default depends on the platform.
3. Iterate over the file object itself rather than calling `readlines()`.

Here is the pattern in full:

```python
import csv
from pathlib import Path


def totals(path: Path) -> dict[str, float]:
    result: dict[str, float] = {{}}
    with path.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            region = row["region"].strip()
            result[region] = result.get(region, 0.0) + float(row["total"])
    return result


if __name__ == "__main__":
    for region, total in sorted(totals(Path("sales.csv")).items()):
        print(f"{{region:<12}} {{total:>10.2f}}")
```

| Format | Module | Streams? | Notes |
|---|---|---|---|
| CSV | `csv` | yes | mind the `newline=""` |
| JSON | `json` | no | use `ijson` for huge files |
| TOML | `tomllib` | no | read-only, binary mode |
| XML | `xml.etree` | yes | `iterparse` for large files |

> **Tip:** when a file comes from someone else, treat its contents as untrusted: never pass
> it to `eval`, and check sizes before you read everything into memory.

- Large files: read in chunks, or line by line.
- Compressed files: `gzip.open` and `bz2.open` work like `open`.
- Binary files: open with `"rb"` and work with `bytes`.

That is the core of it; the next part builds on these functions.

"""


def markdown_reply(tokens: int) -> str:
    """A reply of exactly ``tokens`` tokens (TOKEN), made of sections like a model's answer.

    Each section after the first has the words of its lines shuffled (a line's marker, its
    indentation, fences and table rows kept), so no section repeats another: a compressor
    must pay for every section's text, as for a real reply."""
    pieces: list[str] = []
    for n in itertools.count(1):
        section = SECTION.format(n=n)
        if n > 1:
            section = "\n".join(_shuffled_words(line, random.Random(n * 1000 + i))
                                for i, line in enumerate(section.split("\n")))
        pieces += TOKEN.findall(section)
        if len(pieces) >= tokens:
            return "".join(pieces[:tokens])
    raise AssertionError("unreachable")


LINE_MARKER = re.compile(r"^(\s*(?:[-*>]|\d+\.|#+)?\s*)(.*)$")


def _shuffled_words(line: str, rng: random.Random) -> str:
    if line.startswith(("|", "```")):
        return line
    marker, rest = LINE_MARKER.match(line).groups()
    words = rest.split(" ")
    rng.shuffle(words)
    return marker + " ".join(words)


class WholeReply:
    """Main's way before block deltas: the whole reply rendered again at every update."""

    def __init__(self, turn: Turn) -> None:
        self.turn = turn

    def update(self, text: str) -> str:
        return reply_fragment(self.turn, text, streaming=False)

    def end(self, text: str, note: str) -> str:
        return reply_fragment(self.turn, text, streaming=False, note=note)


class CountingFragments:
    """Wraps a way of sending a reply and counts the bytes of its fragments."""

    def __init__(self, inner: ReplyFragments) -> None:
        self.inner = inner
        self.bytes = 0
        self.updates = 0

    def update(self, text: str) -> str:
        return self._count(self.inner.update(text))

    def end(self, text: str, note: str) -> str:
        return self._count(self.inner.end(text, note))

    def _count(self, fragment: str) -> str:
        self.bytes += len(fragment.encode("utf-8"))
        self.updates += bool(fragment)
        return fragment


class BrowserWire:
    """The server's frames as a browser receives them: permessage-deflate, context takeover.

    A wsproto server connection (what simple-websocket sends with) accepts a client's offer of
    ``permessage-deflate; client_max_window_bits``, as Chromium and Firefox send it; each text
    frame's bytes are counted (its compression is server CPU, counted in the turn's), and
    :meth:`check` has a wsproto client decompress every frame after the turn: the texts sent."""

    def __init__(self) -> None:
        self.server = WSConnection(ConnectionType.SERVER)
        self.client = WSConnection(ConnectionType.CLIENT)
        self.server.receive_data(self.client.send(Request(
            host="localhost", target="/ws/chat", extensions=[PerMessageDeflate()])))
        [request] = self.server.events()
        assert isinstance(request, Request)
        self.client.receive_data(self.server.send(AcceptConnection(
            extensions=[PerMessageDeflate()])))
        [accepted] = self.client.events()
        assert [e.name for e in accepted.extensions] == ["permessage-deflate"]

        self.sent: list[tuple[str, bytes]] = []

    def frame_bytes(self, text: str) -> int:
        frame = self.server.send(Message(data=text))
        self.sent.append((text, frame))
        return len(frame)

    def check(self) -> None:
        for text, frame in self.sent:
            self.client.receive_data(frame)
            received = "".join(e.data for e in self.client.events()
                               if isinstance(e, TextMessage))
            assert received == text, "a compressed frame did not read back as the text sent"


class CountingSocket:
    """Stands in for the websocket: nothing arrives, what is sent is counted (as text, and
    as the compressed frames a browser receives)."""

    connected = True
    input_buffer = ()

    def __init__(self) -> None:
        self.bytes = 0
        self.wire_bytes = 0
        self.wire = BrowserWire()

    def send(self, text: str) -> None:
        self.bytes += len(text.encode("utf-8"))
        self.wire_bytes += self.wire.frame_bytes(text)

    def receive(self, timeout: float | None = None) -> None:
        return None


class VirtualClock:
    """``time`` for the socket module: the real clock plus the time the tokens took."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


class ScriptedGeneration:
    """The engine's side: ``tokens`` one by one at ``rate`` per second of the virtual clock."""

    def __init__(self, request, tokens: list[str], rate: float, clock: VirtualClock) -> None:
        self.request, self.tokens, self.rate, self.clock = request, tokens, rate, clock
        self.cancelled = False
        self.prompt_text = "<|im_start|>user\nTell me about files in Python.<|im_end|>\n"
        self.prompt_by_upstream = False
        self._events = self._script()

    def _script(self):
        for token in self.tokens:
            self.clock.offset += 1 / self.rate
            yield Delta(token)
        text = "".join(self.tokens)
        yield Done(FinishReason.STOP, text, 10, len(self.tokens), 0, {})

    def next_event(self, timeout: float | None = None):
        return next(self._events)

    def cancel(self) -> None:
        self.cancelled = True


class SteppedRun(ReplyRun):
    """A reply run read by its watcher, one event per wait: the socket sees every token (a
    real run, on its own greenlet, would hand it several at once here)."""

    def start(self) -> None:
        pass

    def wait_for(self, version: int, timeout: float) -> bool:
        if self.ended is None:
            outcome = self._take(self.generation.next_event())
            if outcome is not None:
                self._finish(outcome)
        return True

    def wait_for_end(self, timeout: float) -> bool:
        self.wait_for(self.version, timeout)  # one more event: the virtual clock moves on
        return self.ended is not None


@dataclass
class Measured:
    reply_bytes: int
    socket_bytes: int
    wire_bytes: int  # socket_bytes as compressed frames (BrowserWire)
    final_html: int
    updates: int
    cpu_per_token_us: float


def stream_once(app, way, tokens: list[str], rate: float, streams: int) -> Measured:
    """One reply through ChatSocket.send_prompt, sent ``way`` (a ReplyFragments class)."""
    runtime = app.extensions["tanglebox"]
    clock = VirtualClock()
    counted: list[CountingFragments] = []

    class Socket(ui_socket.ChatSocket):
        def reply_fragments(self, turn: Turn) -> ReplyFragments:  # type: ignore[override]
            counted.append(CountingFragments(way(turn)))
            return counted[-1]

    submit = runtime.submit
    runtime.submit = lambda request: ScriptedGeneration(request, tokens, rate, clock)
    ws = CountingSocket()
    conversation = new_conversation("bench-ui-deltas-0001", PAGE, runtime.settings)
    real_time = ui_reply_watch.time
    ui_reply_watch.time = clock  # the socket's pacing reads the virtual clock
    ui_reply_watch.RENDER_PACER.streaming += streams - 1  # the others, as RenderPacer counts
    try:
        with app.test_request_context("/ws/chat"):
            chat = Socket(ws, runtime, conversation, "bench")
            chat.chats.runs.run_class = SteppedRun
            started = time.process_time()
            chat.send_prompt("Tell me about files in Python.")
            cpu = time.process_time() - started
            final = reply_fragment(conversation.turns[-1], "".join(tokens), streaming=False)
    finally:
        runtime.submit = submit
        ui_reply_watch.time = real_time
        ui_reply_watch.RENDER_PACER.streaming -= streams - 1
        chat.chats.runs.run_class = ReplyRun
    [fragments] = counted
    ws.wire.check()
    return Measured(fragments.bytes, ws.bytes, ws.wire_bytes, len(final.encode("utf-8")),
                    fragments.updates, cpu / len(tokens) * 1e6)


def run(tokens: int, rates: list[float], rounds: int, streams: int) -> str:
    with tempfile.TemporaryDirectory() as folder:
        settings = load_settings(Path(folder) / "settings.json")
        app = create_app(settings, Runtime(settings))
        pieces = TOKEN.findall(markdown_reply(tokens))
        text = "".join(pieces)
        final_html = str(render_markdown(text))
        lines = [f"CPU: {cpu_description()}",
                 f"reply: {len(pieces)} tokens, {len(text)} characters, final reply HTML "
                 f"{len(final_html.encode())} bytes ({BrowserWire().frame_bytes(final_html)} "
                 f"as one compressed frame); {streams} stream(s) "
                 f"counted by RenderPacer; medians of {rounds} rounds",
                 "",
                 "| tokens/s | way | updates | reply bytes | x final HTML | socket bytes "
                 "| on the wire (deflate) | wire x final HTML | CPU µs/token |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for rate in rates:
            results: dict[str, list[Measured]] = {"whole": [], "deltas": []}
            for _ in range(rounds):  # the two ways in turns, so drift hits both alike
                results["whole"].append(stream_once(app, WholeReply, pieces, rate, streams))
                results["deltas"].append(stream_once(app, StreamedReply, pieces, rate, streams))
            for way, measured in results.items():
                def median(name: str) -> float:
                    return statistics.median(getattr(m, name) for m in measured)
                lines.append(
                    f"| {rate:g} | {way} | {median('updates'):.0f} | "
                    f"{median('reply_bytes') / 1e3:,.0f} kB | "
                    f"{median('reply_bytes') / median('final_html'):.2f} | "
                    f"{median('socket_bytes') / 1e3:,.0f} kB | "
                    f"{median('wire_bytes') / 1e3:,.1f} kB | "
                    f"{median('wire_bytes') / median('final_html'):.2f} | "
                    f"{median('cpu_per_token_us'):.0f} |")
        return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--rates", default="20,50,100",
                        help="tokens per second of one reply, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=1,
                        help="replies streaming at once, as RenderPacer counts them")
    args = parser.parse_args()
    print(run(args.tokens, [float(r) for r in args.rates.split(",")], args.rounds,
              args.streams))


if __name__ == "__main__":
    main()
